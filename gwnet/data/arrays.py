"""Arrays read from files, bounded and checked before anything is allocated or converted.

A ``.npz`` is a zip of ``.npy`` members; each member's header states its shape and dtype in a
few bytes, and a compressed member of a megabyte can inflate to gigabytes. :func:`npz_members`
reads the headers alone and refuses a member whose stated size disagrees with the size the zip
declares for it, or that exceeds what gwnet reads (:func:`check_affordable`: a fixed ceiling
and the memory available now). :func:`load_sparse_npz` reads a ``scipy.sparse.save_npz`` file
member by member and checks its structure in full (shape, ``indptr`` starting at 0, monotone
and ending at the number of entries, every index inside the shape) before scipy sees it:
scipy trusts these arrays and writes out of bounds when it densifies a crafted one.
"""
from __future__ import annotations

import zipfile
from typing import Any

import numpy as np

from ..errors import GWNetError, file_error

# What one array read from a file may take: a year of LargeST-CA flow with three features is 3.6 GB.
MAX_ARRAY_BYTES = 16 * 1024 ** 3
SPARSE_FORMATS = ("csr", "csc", "coo")


def available_memory() -> int | None:
    """MemAvailable of this machine in bytes (``None`` where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_affordable(path, what: str, nbytes: float) -> None:
    """Refuse, before allocating, an array of ``nbytes`` beyond :data:`MAX_ARRAY_BYTES` or the
    memory available now."""
    if nbytes > MAX_ARRAY_BYTES:
        raise file_error(path, f"{what} ({nbytes / 1024 ** 3:,.1f} GiB), more than the "
                         f"{MAX_ARRAY_BYTES // 1024 ** 3} GiB gwnet reads")
    free = available_memory()
    if free is not None and nbytes > free:
        raise file_error(path, f"{what} ({nbytes / 1024 ** 3:,.1f} GiB), more than the "
                         f"{free / 1024 ** 3:,.1f} GiB of memory available")


def npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a ``.npy`` stream's header states; nothing else is read (the stream
    is left where the array's bytes begin)."""
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    shape, _, dtype = fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh)
    return tuple(int(v) for v in shape), np.dtype(dtype)


def npz_members(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{name: (shape, dtype)}`` of every array of a ``.npz``, read from the headers alone, each
    checked against the size the zip declares for it and against :func:`check_affordable`."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[:-4]
                with zf.open(info) as fh:
                    shape, dtype = npy_header(fh)
                    start = fh.tell()
                if dtype.hasobject:
                    raise file_error(path, f"array {name!r} holds Python objects; gwnet reads numbers only")
                if any(n < 0 for n in shape):
                    raise file_error(path, f"array {name!r} states a negative shape {shape}")
                nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                check_affordable(path, f"array {name!r} states shape {shape}", nbytes)
                if start + nbytes != info.file_size:
                    raise file_error(path, f"array {name!r} states shape {shape} ({nbytes:,} bytes), but its zip "
                                     f"member holds {info.file_size - start:,} (a crafted or damaged file)")
                out[name] = (shape, dtype)
    except GWNetError:
        raise
    except Exception as exc:  # zip and header errors alike
        raise file_error(path, f"not a readable .npz ({' '.join(str(exc).split())[:160]})") from None
    return out


def _member(npz, path, name: str) -> np.ndarray:
    if name not in npz.files:
        raise file_error(path, f"sparse matrix lacks its {name!r} array")
    return npz[name]


def load_sparse_npz(path, max_side: int | None = None) -> Any:
    """The scipy sparse matrix of a ``save_npz`` file, its structure checked in full first."""
    import scipy.sparse as sp

    npz_members(path)  # every member bounded before any is read
    try:
        with np.load(path, allow_pickle=False) as npz:
            fmt = _member(npz, path, "format")
            fmt = fmt.item().decode() if fmt.dtype.kind == "S" else str(fmt.item())
            if fmt not in SPARSE_FORMATS:
                raise file_error(path, f"sparse format {fmt!r} is not read (save it as csr, csc or coo)")
            shape = _member(npz, path, "shape")
            if shape.shape != (2,) or shape.dtype.kind not in "iu":
                raise file_error(path, f"sparse 'shape' is {shape!r}, not two integers")
            rows, cols = (int(v) for v in shape)
            if rows < 1 or cols < 1 or max_side is not None and max(rows, cols) > max_side:
                raise file_error(path, f"sparse matrix states shape {rows} x {cols}"
                                 + (f"; gwnet reads 1 to {max_side:,} sensors" if max_side else ""))
            data = _member(npz, path, "data")
            if data.ndim != 1 or data.dtype.kind not in "fiub":
                raise file_error(path, f"sparse 'data' is {data.dtype} {data.shape}, not a list of numbers")
            if fmt == "coo":
                row, col = _member(npz, path, "row"), _member(npz, path, "col")
                _indices(path, "row", row, rows, len(data))
                _indices(path, "col", col, cols, len(data))
                return sp.coo_matrix((data, (row, col)), shape=(rows, cols))
            major, minor = (rows, cols) if fmt == "csr" else (cols, rows)
            indices, indptr = _member(npz, path, "indices"), _member(npz, path, "indptr")
            _indices(path, "indices", indices, minor, len(data))
            if indptr.ndim != 1 or indptr.dtype.kind not in "iu" or len(indptr) != major + 1:
                raise file_error(path, f"sparse 'indptr' has {indptr.shape} entries, not {major + 1} (one more than "
                                 f"the {major} {'rows' if fmt == 'csr' else 'columns'})")
            if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr.astype(np.int64)) < 0).any():
                raise file_error(path, f"sparse 'indptr' must rise from 0 to the {len(data)} entries, never falling")
            kind = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
            return kind((data, indices, indptr), shape=(rows, cols))
    except GWNetError:
        raise
    except Exception as exc:
        raise file_error(path, f"not a readable sparse matrix ({' '.join(str(exc).split())[:160]})") from None


def _indices(path, name: str, values: np.ndarray, bound: int, count: int) -> None:
    if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) != count:
        raise file_error(path, f"sparse {name!r} is {values.dtype} {values.shape}, not {count} integer indices")
    if count and (int(values.min()) < 0 or int(values.max()) >= bound):
        bad = int(values.max()) if values.max() >= bound else int(values.min())
        raise file_error(path, f"sparse {name!r} holds index {bad}, outside 0..{bound - 1} (the matrix's shape)")
