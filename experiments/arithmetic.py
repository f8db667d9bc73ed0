"""How much arithmetic a step does.

:func:`count_flops` is torch's FLOP counter (``torch.utils.flop_counter``) with the matrix
products counted the way gwnet runs them: the in-place accumulations (``addmm_``: the
Horner partial sums, the adaptive adjacency's gradient, ``dx += d W``), which torch's
table leaves out, are counted, and a product with a sparse operand counts
:math:`2\\,\\mathrm{nnz}\\,n` instead of the dense :math:`2mkn` (a CSR road graph has 8
non-zeros a row, not 207). Convolutions and the rest keep torch's formulas.

The benchmark reads these counts against the rate of one large square product
(``benchmark.gemm_rate``): a model's achieved rate and its time at that rate (its
arithmetic floor).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _rows_cols_work(t) -> tuple[int, int, int | None]:
    """(rows, columns, non-zeros or None if dense) of a matrix operand. Works on shapes too,
    should the counter ever hand formulas shapes instead of tensors."""
    if isinstance(t, torch.Tensor):
        rows, cols = t.shape
        return rows, cols, t._nnz() if t.layout != torch.strided else None
    rows, cols = t
    return rows, cols, None


def _product_flops(a, b) -> int:
    """Multiply-adds times two of ``a @ b``, sparse operands by their non-zeros."""
    m, k, a_nnz = _rows_cols_work(a)
    k2, n, b_nnz = _rows_cols_work(b)
    if k != k2:
        raise ValueError(f"product of {m}x{k} by {k2}x{n}")
    if a_nnz is not None:
        return 2 * a_nnz * n
    if b_nnz is not None:
        return 2 * m * b_nnz
    return 2 * m * k * n


def _mm(a, b, *args, out_val=None, **kwargs) -> int:
    return _product_flops(a, b)


def _addmm(bias, a, b, *args, out_val=None, **kwargs) -> int:
    return _product_flops(a, b)


# The counter hands formulas flagged this way the tensors themselves (layout and nnz
# included), not only their shapes.
for _formula in (_mm, _addmm):
    _formula._get_raw = True

PRODUCTS = {aten.mm: _mm, aten.addmm: _addmm, aten.addmm_: _addmm}


def count_flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (see the module docstring)."""
    with FlopCounterMode(display=False, custom_mapping=PRODUCTS) as counter:
        fn()
    return counter.get_total_flops()
