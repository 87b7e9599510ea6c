"""Image and mask encoding/decoding on the host (PNG/JPEG through Pillow)."""

from __future__ import annotations

import io

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
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt data
        raise BadRecordError(record_id, field, f"unreadable image ({e})") from e


def read_image_file(path: str, record_id: str = "?", field: str = "image") -> np.ndarray:
    """Read an image file to uint8 (H, W, 3); missing or unreadable files name the record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadRecordError(record_id, field, f"missing image file {path} ({e})") from e
    return decode_image(data, record_id, field)
