"""Batched JPEG decoding and preprocessing on tensors (on a GPU).

The CPUs of a GPU box cannot decode fast enough to feed it (FACTS: ~450 img/s from 16
cores with PIL). Here a batch of JPEG byte strings is decoded on the device and resized,
cropped and normalised there from uint8, mirroring the recipe of
:class:`extract.preprocess.Preprocessing` (resize with antialiased bicubic/bilinear,
rounded back to 8 bits as PIL does, center crop, mean/std). Two batch decoders:

``nvimgcodec``
    nvImageCodec (``pip install nvidia-nvimgcodec-cu13[nvjpeg]``): on data-centre GPUs
    with hardware JPEG engines (A100, H100, H200) the decode runs on those engines and
    leaves the SMs to the model; files the engines do not take go to nvImageCodec's CUDA
    decoder. On a machine without CUDA it runs libjpeg-turbo (how it is tested here).
``nvjpeg``
    torchvision's ``decode_jpeg(..., device="cuda")``: nvJPEG kernels on the SMs. On a
    CPU device the same call runs libjpeg-turbo.

Anything the batch decoder should not or cannot handle -- non-JPEG files, CMYK or
EXIF-rotated JPEGs, corrupt data -- is returned for per-image CPU decoding, so a batch
never fails as a whole. On a CPU device the same code runs with libjpeg-turbo, which is
how the tensor path is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from cache.errors import Stage1Error
from extract.preprocess import Preprocessing

BATCH_DECODERS = ("nvimgcodec", "nvjpeg")
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

@contextlib.contextmanager
def _quiet_stderr():
    """nvImageCodec prints to the C-level stderr when it loads its optional extensions
    (JPEG 2000, TIFF); those are not used here."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


_NVIMGCODEC: list[ModuleType | None] = []


def nvimgcodec() -> ModuleType | None:
    """The ``nvidia.nvimgcodec`` module, or None where it is not installed (or broken)."""
    if not _NVIMGCODEC:
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # per-image errors are handled here
        try:
            with _quiet_stderr():
                from nvidia import nvimgcodec as mod
        except Exception:  # ImportError, or a CUDA runtime it cannot load
            mod = None
        _NVIMGCODEC.append(mod)
    return _NVIMGCODEC[0]


def _make_nvimgcodec_decoder(device: torch.device, *, hardware_only: bool = False):
    n = nvimgcodec()
    if device.type == "cuda":
        kinds = [n.BackendKind.HW_GPU_ONLY] + ([] if hardware_only else [n.BackendKind.GPU_ONLY])
        dev = device.index if device.index is not None else torch.cuda.current_device()
    else:
        kinds, dev = [n.BackendKind.CPU_ONLY], n.NVIMGCODEC_DEVICE_CPU_ONLY
    with _quiet_stderr():
        return n.Decoder(device_id=dev, backends=[n.Backend(k) for k in kinds])


def has_jpeg_engines(device: torch.device) -> bool:
    """True where nvImageCodec is installed and decodes a JPEG on the GPU's hardware JPEG
    engines (A100/H100/H200 class), probed by decoding one small image."""
    if device.type != "cuda" or nvimgcodec() is None:
        return False
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, format="JPEG", quality=90)
    try:
        dec = _make_nvimgcodec_decoder(device, hardware_only=True)
        with _quiet_stderr():
            out = dec.decode([nvimgcodec().CodeStream(buf.getvalue())])
        return out[0] is not None
    except Exception:
        return False


def resolve_batch_decoder(name: str, device: torch.device) -> str:
    """'auto' -> the best batch decoder this machine has: ``nvimgcodec`` where the GPU has
    hardware JPEG engines, else ``nvjpeg`` on a GPU, else ``pil``. Explicit names are
    checked: a clear error if the machine cannot run them."""
    if name == "auto":
        if device.type != "cuda":
            return "pil"
        return "nvimgcodec" if has_jpeg_engines(device) else "nvjpeg"
    if name == "nvimgcodec" and nvimgcodec() is None:
        raise Stage1Error("--decoder nvimgcodec: nvImageCodec is not installed; "
                          "pip install 'nvidia-nvimgcodec-cu13[nvjpeg]', or use --decoder nvjpeg or pil")
    if name in BATCH_DECODERS and device.type != "cuda":
        raise Stage1Error(f"--decoder {name} needs a CUDA device; use --decoder pil on a CPU")
    return name


def resized_size(h: int, w: int, recipe: Preprocessing) -> tuple[int, int]:
    """Output size of the recipe's resize (torchvision's rule for an int size)."""
    if recipe.preset != "baseline":
        return recipe.resize, recipe.resize
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = recipe.resize, int(recipe.resize * long / short)
    return (new_short, new_long) if h <= w else (new_long, new_short)


class BatchPreprocessor:
    """``list of JPEG bytes`` -> ``(B, 3, S, S)`` normalised float tensor on ``device``.

    ``decoder``: ``'nvjpeg'`` (torchvision) or ``'nvimgcodec'``. One instance may be used
    from several threads: they share one nvImageCodec decoder, one batch at a time (the
    JPEG engines measured slower when several decoders fed them at once)."""

    def __init__(self, recipe: Preprocessing, device: torch.device, *, decoder: str = "nvjpeg") -> None:
        if decoder not in BATCH_DECODERS:
            raise ValueError(f"decoder must be one of {BATCH_DECODERS}, got {decoder!r}")
        if decoder == "nvimgcodec" and nvimgcodec() is None:
            raise Stage1Error("nvImageCodec is not installed: pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'")
        self.recipe, self.device, self.decoder = recipe, device, decoder
        self._nv_lock = threading.Lock()
        self._nv_decoder = self._nv_params = None
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
        if todo and self.decoder == "nvimgcodec":
            for i, im in zip(todo, self._decode_nvimgcodec([datas[i] for i in todo]), strict=True):
                if im is None:
                    cpu.append(i)
                else:
                    out[i] = im
        elif todo:
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

    def _decode_nvimgcodec(self, datas: Sequence[bytes | bytearray]) -> list[torch.Tensor | None]:
        """One batched nvImageCodec call; ``(3, H, W)`` uint8 views (None: not decoded)."""
        n = nvimgcodec()
        streams, pos = [], []
        for k, d in enumerate(datas):
            try:
                streams.append(n.CodeStream(np.frombuffer(d, dtype=np.uint8)))
                pos.append(k)
            except RuntimeError:  # unparsable header
                pass
        out: list[torch.Tensor | None] = [None] * len(datas)
        if not streams:
            return out
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
        with self._nv_lock:
            if self._nv_decoder is None:
                self._nv_decoder = _make_nvimgcodec_decoder(self.device)
                # EXIF-rotated files never get here (needs_cpu): decode the stored orientation
                self._nv_params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
            imgs = self._nv_decoder.decode(streams, params=self._nv_params, cuda_stream=stream)
        for k, im in zip(pos, imgs, strict=True):
            if im is None or im.num_channels != 3:
                continue
            # zero-copy: __cuda_array_interface__ on the GPU, the array interface on the host
            t = torch.as_tensor(im, device=self.device) if cuda else torch.from_numpy(np.asarray(im))
            out[k] = t.permute(2, 0, 1)
        return out

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
