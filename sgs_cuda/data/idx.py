"""Reader for the IDX format of (Fashion-)MNIST, raw or gzip-compressed.

IDX: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
dimension and the data, big-endian, in C order.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzip detected from its content, not its name) into a native-endian array.

    Raises ``ValueError`` naming the file when the header or the size is wrong, so a truncated
    download or an HTML error page saved under the right name is reported as such.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX data has {len(raw) - header} bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as IDX (gzip when ``compress`` or the name ends in ``.gz``); for tests and tools."""
    path = Path(path)
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    data = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() \
        + array.astype(IDX_TYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=1)
    path.write_bytes(data)
    return path
