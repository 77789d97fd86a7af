"""What decoding a still image or a stored JPEG frame costs, from its header alone.

The pixel bound (``data.max_image_pixels``) holds whatever the encoding: PIL reads the
SOF / IHDR header on open and decodes nothing until asked. A baseline JPEG decoded at
reduced scale (PIL ``draft``) costs the reduced pixels; a progressive JPEG keeps a
coefficient buffer for the whole image whatever the scale, so it costs its full size;
and each of its scans is another pass over that buffer, so a JPEG of more than
:data:`MAX_JPEG_SCANS` scans is refused (1000 repeated scans took 25 s for one frame).
"""

from __future__ import annotations

from typing import Optional

MAX_JPEG_SCANS = 64  # libjpeg's progressive scripts use about 10; the rest is a decode-time bomb
_SOS = b"\xff\xda"  # start of scan: 0xFF in entropy-coded data is stuffed (FF00), so each is a real scan


def is_progressive(im) -> bool:
    """Whether a PIL JPEG image is progressive (SOF2/6/10/14 in its header)."""
    return bool(im.info.get("progressive") or im.info.get("progression"))


def decode_cost_problem(im, data: bytes, max_pixels: int, full_size: Optional[tuple[int, int]] = None,
                        whole: bool = False) -> Optional[str]:
    """Why decoding the opened (not yet decoded) PIL image ``im`` of bytes ``data`` would
    cost more than ``max_pixels``; None when it fits. ``full_size``: the size before a
    ``draft`` already applied to ``im``; ``whole``: the decoder cannot reduce the scale
    (the GPU path)."""
    w, h = full_size or im.size
    what = f"{w}x{h} {im.format}"
    pixels = w * h
    if im.format == "JPEG":
        scans = data.count(_SOS)
        if scans > MAX_JPEG_SCANS:
            return f"{what} has {scans} scans > {MAX_JPEG_SCANS} (decode cost)"
        if is_progressive(im):
            what += " progressive (decoded at full size whatever the scale)"
        elif not whole:
            pixels = im.size[0] * im.size[1]  # after draft: what the decoder makes
    if pixels > max_pixels:
        return f"{what}: {pixels} pixels to decode > data.max_image_pixels={max_pixels}"
    return None
