"""Decoding odd and broken files; the default recipe equals the users' baseline transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as TV

from cache import Stage1Error
from extract.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeError,
    Preprocessing,
    decode_image,
    load_and_preprocess,
)


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    arr[:, :200] = (250, 20, 20)  # left half red: orientation is checkable
    return Image.fromarray(arr)


def test_default_recipe_equals_users_baseline(photo):
    ours = Preprocessing.from_preset("baseline").transform()(photo)
    base = TV.Compose([TV.Resize(256, interpolation=TV.InterpolationMode.BICUBIC), TV.CenterCrop(224),
                       TV.ToTensor(), TV.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(photo)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, base, atol=1e-5, rtol=0)


def test_hf_preset_is_square_resize(photo):
    r = Preprocessing.from_preset("hf")
    assert (r.resize, r.crop, r.interpolation) == (224, None, "bilinear")
    assert r.transform()(photo).shape == (3, 224, 224)
    assert Preprocessing.from_preset("baseline", image_size=448).resize == 512
    with pytest.raises(Stage1Error, match="multiple of the patch size"):
        Preprocessing.from_preset("baseline", image_size=230)
    with pytest.raises(Stage1Error, match="unknown preprocessing preset"):
        Preprocessing.from_preset("squash")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_odd_modes_become_rgb(photo, mode):
    if mode == "I;16":
        arr = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
        img, fmt = Image.fromarray(arr), "PNG"
    else:
        img = photo.convert(mode)
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_image(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == photo.size
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped to white
        np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(photo.convert("L")), atol=1)


def test_exif_orientation_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90 degrees clockwise
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    out = decode_image(_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == photo.size
    left, right = np.asarray(out)[:, :150].mean(axis=(0, 1)), np.asarray(out)[:, 250:].mean(axis=(0, 1))
    assert left[0] > 200 and left[1] < 60 and abs(right[0] - 127) < 20  # red half back on the left
    raw = decode_image(_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()), exif_transpose=False)
    assert raw.size == stored.size


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
    ("truncated", "cannot decode"),
])
def test_broken_files_raise_decode_error(photo, data, reason):
    if data == "truncated":
        full = _bytes(photo, "JPEG", quality=90)
        data = full[: len(full) // 3]
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_load_and_preprocess_hash_and_missing(tmp_path, photo):
    import hashlib

    p = tmp_path / "x.png"
    photo.save(p)
    x, sha = load_and_preprocess(str(p), Preprocessing())
    assert sha == hashlib.sha256(p.read_bytes()).hexdigest() and x.shape == (3, 224, 224)
    with pytest.raises(DecodeError, match="file not found"):
        load_and_preprocess(str(tmp_path / "gone.jpg"), Preprocessing())
