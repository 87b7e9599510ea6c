"""Image and mask encoding/decoding on the host (PNG/JPEG through Pillow)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from refjax.data.errors import BadRecordError


def encode_png(array: np.ndarray) -> bytes:
    """Encode uint8 (H, W), (H, W, 1) or (H, W, 3) as PNG bytes (binary masks stay 0/1)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def decode_image(data: bytes, record_id: str = "?", field: str = "image") -> np.ndarray:
    """Decode encoded image bytes to uint8 (H, W, 3); a clear BadRecordError otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise BadRecordError(record_id, field, f"unreadable image ({e})") from e


def decode_mask(data: bytes, record_id: str = "?", field: str = "mask") -> np.ndarray:
    """Decode an encoded mask to uint8 (H, W) 0/1 (any non-zero first channel is 1).

    Grayscale PNGs (what the builders write) skip the RGB conversion ``decode_image`` makes;
    other modes take the first channel of their RGB conversion, as ``decode_image`` would.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            a = np.asarray(im) if im.mode == "L" else np.asarray(im.convert("RGB"))[..., 0]
    except Exception as e:  # PIL raises several types for corrupt data
        raise BadRecordError(record_id, field, f"unreadable mask ({e})") from e
    return (a > 0).astype(np.uint8)


class LazyImage:
    """An encoded image of declared size (H, W, 3), decoded on first use (``np.asarray``).

    A pipeline can read a record, decide from its expressions alone that the example is not
    used, and never pay for the pixels. A decoded size other than the declared one raises
    ``BadRecordError`` naming the record and ``image/height``.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, data: bytes, height: int, width: int, record_id: str = "?"):
        self.data, self.record_id = bytes(data), record_id
        self.shape = (int(height), int(width), 3)
        self._array: np.ndarray | None = None

    def decode(self) -> np.ndarray:
        """The uint8 (H, W, 3) pixels (decoded once)."""
        if self._array is None:
            a = decode_image(self.data, self.record_id, "image")
            if a.shape != self.shape:
                raise BadRecordError(self.record_id, "image/height",
                                     f"declared size {self.shape[:2]} != decoded size "
                                     f"{a.shape[:2]}")
            self._array = a
        return self._array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.decode()  # cached and read-only: a copy when one is asked for
        if dtype is not None:
            return a.astype(dtype)
        return a.copy() if copy else a


class LazyMasks:
    """``(K, H, W)`` uint8 0/1 masks kept encoded; each is decoded (and its size checked) when
    first indexed, so an example pays only for the masks it uses.

    ``masks[j]`` is one (H, W) mask, ``masks[index_array]`` a stack, ``np.asarray(masks)`` all
    of them. A mask of another size raises ``BadRecordError`` naming the record and
    ``field[j]``.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, encoded: Any, height: int, width: int, record_id: str, field: str):
        self.encoded = [bytes(m) for m in encoded]
        self.shape = (len(self.encoded), int(height), int(width))
        self.record_id, self.field = record_id, field
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _one(self, j: int) -> np.ndarray:
        if j not in self._cache:
            m = decode_mask(self.encoded[j], self.record_id, f"{self.field}[{j}]")
            if m.shape != self.shape[1:]:
                raise BadRecordError(self.record_id, f"{self.field}[{j}]",
                                     f"mask shape {m.shape} != image {self.shape[1:]}")
            self._cache[j] = m
        return self._cache[j]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._one(int(np.arange(len(self))[index]))
        picked = np.arange(len(self))[index].reshape(-1)
        if not picked.size:
            return np.zeros((0, *self.shape[1:]), np.uint8)
        return np.stack([self._one(int(j)) for j in picked])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[np.arange(len(self))]
        return a if dtype is None else a.astype(dtype)


def read_image_file(path: str, record_id: str = "?", field: str = "image") -> np.ndarray:
    """Read an image file to uint8 (H, W, 3); missing or unreadable files name the record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadRecordError(record_id, field, f"missing image file {path} ({e})") from e
    return decode_image(data, record_id, field)
