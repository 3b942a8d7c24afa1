"""Batched JPEG decoding and preprocessing on tensors (nvJPEG on a GPU).

The CPUs of a GPU box cannot decode fast enough to feed it (FACTS: ~450 img/s from 16
cores with PIL). Here a batch of JPEG byte strings is decoded by
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG) and resized, cropped and
normalised on the same device from uint8, mirroring the recipe of
:class:`extract.preprocess.Preprocessing` (resize with antialiased bicubic/bilinear,
rounded back to 8 bits as PIL does, center crop, mean/std).

Anything the batch decoder should not or cannot handle -- non-JPEG files, CMYK or
EXIF-rotated JPEGs, corrupt data -- is returned for per-image CPU decoding, so a batch
never fails as a whole. On a CPU device the same code runs with libjpeg-turbo, which is
how the tensor path is tested without a GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from extract.preprocess import Preprocessing

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


def needs_cpu(data: bytes | bytearray) -> bool:
    """True for files the batched decoder must not take: not a JPEG, not 1 or 3 colour
    components (CMYK/YCCK), or an EXIF orientation other than upright (nvJPEG ignores
    EXIF). A marker walk over the header bytes: no image library, microseconds a file."""
    if not data.startswith(_JPEG_MAGIC):
        return True
    if bytes(data[-64:]).rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
        return True  # no end-of-image marker: truncated; nvJPEG would return a grey-filled image
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker == 0xE1 and _exif_orientation(bytes(data[pos + 4:pos + 2 + length])) != 1:
            return True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            return pos + 9 >= n or data[pos + 9] not in (1, 3)
        if marker == 0xDA:  # start of scan before any frame header
            return True
        pos += 2 + length
    return True
def resized_size(h: int, w: int, recipe: Preprocessing) -> tuple[int, int]:
    """Output size of the recipe's resize (torchvision's rule for an int size)."""
    if recipe.preset != "baseline":
        return recipe.resize, recipe.resize
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = recipe.resize, int(recipe.resize * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


class BatchPreprocessor:
    """``list of JPEG bytes`` -> ``(B, 3, S, S)`` normalised float tensor on ``device``."""

    def __init__(self, recipe: Preprocessing, device: torch.device) -> None:
        self.recipe, self.device = recipe, device
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1) * 255.0
        self.mode = "bicubic" if recipe.interpolation == "bicubic" else "bilinear"

    def decode(self, datas: Sequence[bytes | bytearray], *, cpu: Sequence[bool] | None = None
               ) -> tuple[list[torch.Tensor | None], list[int]]:
        """Decoded ``(3, H, W)`` uint8 tensors (None where not decoded) and the positions
        that need the CPU path (``cpu``: precomputed :func:`needs_cpu` flags)."""
        out: list[torch.Tensor | None] = [None] * len(datas)
        flags = cpu if cpu is not None else [needs_cpu(d) for d in datas]
        cpu_pos = [i for i, f in enumerate(flags) if f]
        todo = [i for i, f in enumerate(flags) if not f]
        cpu = cpu_pos
        if todo:
            tensors = [torch.frombuffer(d if isinstance(d, bytearray) else bytearray(d), dtype=torch.uint8)
                       for d in (datas[i] for i in todo)]
            try:
                imgs = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the call: decode one by one
                imgs = []
                for t in tensors:
                    try:
                        imgs.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        imgs.append(None)
            for i, im in zip(todo, imgs, strict=True):
                if im is None:
                    cpu.append(i)
                else:
                    out[i] = im
        return out, sorted(cpu)

    def transform(self, imgs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Resize, crop and normalise decoded images (grouped by size, one batched
        interpolate per group)."""
        r = self.recipe
        s = r.output_size
        out = torch.empty((len(imgs), 3, s, s), device=self.device, dtype=torch.float32)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        for (h, w), idx in groups.items():
            x = torch.stack([imgs[i] for i in idx]).float()
            nh, nw = resized_size(h, w, r)
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode=self.mode, antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255)  # PIL resamples to 8 bits
            if r.crop is not None:
                top, left = int(round((nh - r.crop) / 2.0)), int(round((nw - r.crop) / 2.0))
                x = x[:, :, top:top + r.crop, left:left + r.crop]
            out[idx] = (x - self.mean) / self.std
        return out
