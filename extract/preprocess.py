"""Decoding and preprocessing: the recipe that enters every cache's fingerprint.

Presets
-------
``baseline`` (default)
    the users' eval transform: resize the shorter side to 256 (bicubic), center-crop
    224, ImageNet mean/std. Other sizes keep the 256/224 ratio.
``hf``
    the transformers DINOv3 processor: plain resize to 224x224 (bilinear), no crop.

Decoding is robust: EXIF orientation applied; grayscale, palette, RGBA, CMYK and
16-bit images become 8-bit RGB; anything PIL cannot fully decode raises
:class:`DecodeError` with the reason, which extraction records and skips.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T
from torchvision.transforms.functional import InterpolationMode

from cache.errors import Stage1Error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESETS = ("baseline", "hf")


class DecodeError(Exception):
    """An image file that cannot be turned into pixels; the message is the reason."""


@dataclass(frozen=True)
class Preprocessing:
    preset: str = "baseline"  # 'baseline' (shorter side + center crop) or 'hf' (square resize)
    resize: int = 256  # shorter side (baseline) or square side (hf)
    crop: int | None = 224  # center-crop side; None = no crop
    interpolation: str = "bicubic"  # PIL resampling filter of the resize
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decoder: str = "pil"  # which decoder produced the pixels
    exif_transpose: bool = True  # apply EXIF orientation before resizing

    @classmethod
    def from_preset(cls, preset: str = "baseline", *, image_size: int = 224) -> Preprocessing:
        if preset not in PRESETS:
            raise Stage1Error(f"unknown preprocessing preset {preset!r}; choose one of {list(PRESETS)}")
        if image_size % 16 or image_size <= 0:
            raise Stage1Error(f"--image-size {image_size} must be a positive multiple of the patch size 16")
        if preset == "baseline":
            return cls(preset, resize=round(image_size * 256 / 224), crop=image_size, interpolation="bicubic")
        return cls(preset, resize=image_size, crop=None, interpolation="bilinear")

    @property
    def output_size(self) -> int:
        return self.crop if self.crop is not None else self.resize

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def transform(self) -> T.Compose:
        """PIL RGB image -> normalised float32 ``(3, S, S)`` tensor (torchvision v2 ops)."""
        interp = InterpolationMode(self.interpolation)
        size = self.resize if self.preset == "baseline" else (self.resize, self.resize)
        # Resize and crop act on the PIL image (PIL's filters, as the users' baseline does).
        ops = [T.Resize(size, interpolation=interp, antialias=True)]
        if self.crop is not None:
            ops.append(T.CenterCrop(self.crop))
        ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                T.Normalize(list(self.mean), list(self.std))]
        return T.Compose(ops)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(data: bytes, *, exif_transpose: bool = True) -> Image.Image:
    """Fully decode ``data`` to an 8-bit RGB PIL image, or raise :class:`DecodeError`."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"cannot decode: {e}") from None


def load_and_preprocess(file: str, recipe: Preprocessing, transform=None) -> tuple[torch.Tensor, str]:
    """Read ``file``; return the preprocessed tensor and the sha256 of its bytes.

    Raises :class:`DecodeError` for unreadable or undecodable files.
    """
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except OSError as e:
        raise DecodeError(f"cannot read: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    img = decode_image(data, exif_transpose=recipe.exif_transpose)
    return (transform or recipe.transform())(img), digest
