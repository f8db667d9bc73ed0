"""Graph supports: the normalised adjacency matrices the diffusion convolution propagates over.

Every normalisation of the reference implementation, as sparse CSR matrices (road graphs are
a few percent dense). ``D`` is the diagonal of row sums of ``A``; inverse powers of zero
degrees are taken as 0.

=================== ==================================================
``transition``      ``D^-1 A`` (forward random walk)
``doubletransition`` ``D^-1 A`` and ``D'^-1 A^T`` (forward and backward)
``symnadj``         ``D^-1/2 A^T D^-1/2``
``normlap``         ``I - D^-1/2 A^T D^-1/2``
``scalap``          ``2 L / lambda_max - I`` of ``L = normlap(max(A, A^T))``, lambda_max = 2
``identity``        ``I``
=================== ==================================================
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from ..config import ADJTYPES
from ..errors import GWNetError


def _inverse_degree(adj: sp.csr_matrix, power: float) -> sp.dia_matrix:
    degree = np.asarray(adj.sum(axis=1), dtype=np.float64).ravel()
    with np.errstate(divide="ignore"):
        inv = np.power(degree, power)
    inv[~np.isfinite(inv)] = 0.0
    return sp.diags(inv)


def transition(adj: sp.csr_matrix) -> sp.csr_matrix:
    """Row-normalised random-walk matrix ``D^-1 A``."""
    return (_inverse_degree(adj, -1.0) @ adj).tocsr()


def sym_norm(adj: sp.csr_matrix) -> sp.csr_matrix:
    """``D^-1/2 A^T D^-1/2`` (the reference transposes; equal to the usual form when symmetric)."""
    d = _inverse_degree(adj, -0.5)
    return (d @ adj.T @ d).tocsr()


def normalized_laplacian(adj: sp.csr_matrix) -> sp.csr_matrix:
    """``I - D^-1/2 A^T D^-1/2``."""
    return (sp.identity(adj.shape[0], format="csr") - sym_norm(adj)).tocsr()


def scaled_laplacian(adj: sp.csr_matrix, lambda_max: float = 2.0) -> sp.csr_matrix:
    """Chebyshev-scaled Laplacian of the symmetrised graph, ``2 L / lambda_max - I``."""
    sym = adj.maximum(adj.T).tocsr()
    lap = normalized_laplacian(sym)
    return ((2.0 / lambda_max) * lap - sp.identity(adj.shape[0], format="csr")).tocsr()


def build_supports(adj: np.ndarray | sp.spmatrix, adjtype: str = "doubletransition") -> list[sp.csr_matrix]:
    """The fixed supports of ``adjtype`` for adjacency ``adj`` (row = source), float32 CSR."""
    if adjtype not in ADJTYPES:
        raise GWNetError(f"unknown adjtype {adjtype!r}; choose one of {', '.join(ADJTYPES)}")
    a = sp.csr_matrix(adj, dtype=np.float64)
    if a.shape[0] != a.shape[1]:
        raise GWNetError(f"adjacency must be square, got shape {a.shape}")
    if adjtype == "transition":
        mats = [transition(a)]
    elif adjtype == "doubletransition":
        mats = [transition(a), transition(a.T.tocsr())]
    elif adjtype == "symnadj":
        mats = [sym_norm(a)]
    elif adjtype == "normlap":
        mats = [normalized_laplacian(a)]
    elif adjtype == "scalap":
        mats = [scaled_laplacian(a)]
    else:
        mats = [sp.identity(a.shape[0], format="csr")]
    out = []
    for m in mats:
        m = m.astype(np.float32).tocsr()
        m.eliminate_zeros()
        m.sort_indices()
        out.append(m)
    return out


def to_torch(supports: list[sp.spmatrix], dense: bool = False) -> list[torch.Tensor]:
    """Scipy supports as torch tensors: sparse CSR (default) or dense float32."""
    tensors = []
    with warnings.catch_warnings():
        # torch flags sparse CSR as beta on every construction; the invariants hold by
        # construction (scipy CSR with sorted indices), so checking them is wasted work.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for m in supports:
            tensors.append(_to_tensor(m, dense))
    return tensors


def _to_tensor(m: sp.spmatrix, dense: bool) -> torch.Tensor:
    m = sp.csr_matrix(m, dtype=np.float32)
    if dense:
        return torch.from_numpy(m.toarray())
    return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                   torch.from_numpy(m.indices.astype(np.int64)),
                                   torch.from_numpy(m.data), size=m.shape, check_invariants=False)
