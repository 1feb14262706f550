"""Small image helpers shared by tests (not a test module)."""

import io

from PIL import Image


def jpeg_bytes(seed: int, size=(16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 80, 160)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
