"""JPEG header checks in pure Python (no image library, no torch): which files the batched
GPU decoders must not take."""

from __future__ import annotations

import struct

_JPEG_MAGIC = b"\xff\xd8\xff"


def _exif_orientation(seg: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in an APP1 'Exif' segment payload; 1 if absent."""
    if not seg.startswith(b"Exif\x00\x00") or len(seg) < 14:
        return 1
    tiff = seg[6:]
    bo = "<" if tiff[:2] == b"II" else ">"
    try:
        ifd = struct.unpack(bo + "I", tiff[4:8])[0]
        (count,) = struct.unpack(bo + "H", tiff[ifd:ifd + 2])
        for k in range(count):
            e = ifd + 2 + 12 * k
            tag, typ = struct.unpack(bo + "HH", tiff[e:e + 4])
            if tag == 0x0112:
                return struct.unpack(bo + "H", tiff[e + 8:e + 10])[0]
    except struct.error:
        return 0  # malformed: let the CPU path judge it
    return 1


def jpeg_info(data: bytes | bytearray | memoryview) -> tuple[bool, tuple[int, int] | None]:
    """``(needs_cpu, (height, width))`` from one marker walk over the header bytes: whether
    the batched decoder must not take the file (see :func:`needs_cpu`), and the frame size
    its header states (None where the walk found no usable frame header)."""
    if bytes(data[:3]) != _JPEG_MAGIC:
        return True, None
    if bytes(data[-64:]).rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
        return True, None  # no end-of-image marker: truncated; nvJPEG would return a grey-filled image
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return True, None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and _exif_orientation(bytes(data[pos + 4:pos + 2 + length])) != 1:
            return True, None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            if pos + 9 >= n:
                return True, None
            h, w = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            return data[pos + 9] not in (1, 3), ((h, w) if h and w else None)  # height 0: set by a DNL marker
        if marker == 0xDA:  # start of scan before any frame header
            return True, None
        pos += 2 + length
    return True, None


def needs_cpu(data: bytes | bytearray | memoryview) -> bool:
    """True for files the batched decoder must not take: not a JPEG, not 1 or 3 colour
    components (CMYK/YCCK), or an EXIF orientation other than upright (nvJPEG ignores
    EXIF). A marker walk over the header bytes: no image library, microseconds a file."""
    return jpeg_info(data)[0]
