"""A small real image set built from scikit-learn's digits, in the users' CSV layout.

Each 8x8 digit is drawn at a random place, size and colour on a noisy gradient
background at a photo-like size (480x640 to 1024x768) and saved as JPEG or PNG.
Label 1 ("roadwork") = digit >= 5. A few odd files (grayscale, palette, RGBA, CMYK,
16-bit, EXIF-rotated) and a few broken ones (truncated, not an image, empty) are
included on purpose: extraction must handle the first and record the second.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

SIZES = ((640, 480), (800, 600), (480, 640), (720, 540), (1024, 768))
SPLITS = (("train", 0.6), ("val", 0.25), ("test", 0.15))
BROKEN = ("broken_truncated.jpg", "broken_not_an_image.jpg", "broken_empty.png")


def _render(digit: np.ndarray, rng: np.random.Generator, noise: np.ndarray) -> Image.Image:
    """One photo-sized image of ``digit`` (8x8, values 0..16); ``noise`` is a texture bank."""
    w, h = SIZES[rng.integers(len(SIZES))]
    c0, c1 = rng.uniform(40, 220, 3).astype(np.float32), rng.uniform(40, 220, 3).astype(np.float32)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None] if rng.random() < 0.5 else \
        np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    oy, ox = rng.integers(0, noise.shape[0] - h + 1), rng.integers(0, noise.shape[1] - w + 1)
    img = noise[oy:oy + h, ox:ox + w] + (c0 * (1 - t) + c1 * t)
    side = int(rng.uniform(0.3, 0.55) * min(w, h))
    glyph = Image.fromarray((digit / 16.0 * 255).astype(np.uint8), "L").resize((side, side), Image.BICUBIC)
    m = (np.asarray(glyph, dtype=np.float32) / 255.0)[..., None]
    y0 = int(rng.uniform(0.2, 0.8) * (h - side))
    x0 = int(rng.uniform(0.2, 0.8) * (w - side))
    ink = np.where(img.mean() > 128, rng.uniform(0, 60, 3), rng.uniform(190, 255, 3)).astype(np.float32)
    patch = img[y0:y0 + side, x0:x0 + side]
    img[y0:y0 + side, x0:x0 + side] = patch * (1 - m) + ink * m
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _noise_bank(rng: np.random.Generator) -> np.ndarray:
    """Sensor-like noise (coarse blotches + fine grain), cropped per image."""
    side = max(max(s) for s in SIZES) + 64
    coarse = rng.standard_normal((side // 4, side // 4, 1), dtype=np.float32).repeat(4, 0).repeat(4, 1)
    return 6.0 * coarse + 4.0 * rng.standard_normal((side, side, 1), dtype=np.float32)


def _save_odd(img: Image.Image, kind: str, base: str) -> str:
    """Save ``img`` in an unusual but valid form; returns the file name."""
    if kind == "gray":
        img.convert("L").save(base + ".jpg", quality=90)
        return base + ".jpg"
    if kind == "palette":
        img.convert("P", palette=Image.Palette.ADAPTIVE).save(base + ".png")
        return base + ".png"
    if kind == "rgba":
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(base + ".png")
        return base + ".png"
    if kind == "cmyk":
        img.convert("CMYK").save(base + ".jpg", quality=90)
        return base + ".jpg"
    if kind == "16bit":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(arr).save(base + ".png")
        return base + ".png"
    if kind == "exif":
        # Stored rotated with orientation 6 ("rotate 90 CW to view"): upright once transposed.
        exif = Image.Exif()
        exif[0x0112] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(base + ".jpg", quality=90, exif=exif.tobytes())
        return base + ".jpg"
    raise ValueError(kind)


ODD_KINDS = ("gray", "palette", "rgba", "cmyk", "16bit", "exif")


def build_digits_dataset(root: str, *, n_images: int = 2000, seed: int = 0, progress: bool = True) -> dict[str, str]:
    """Write ``root/images/*`` and ``root/{train,val,test}.csv``; returns the CSV paths.

    Rows are ``images/<name>,label`` with no header (the users' layout). Idempotent:
    an existing complete set (``root/.complete``) is reused.
    """
    from sklearn.datasets import load_digits
    from tqdm.auto import tqdm

    csvs = {name: os.path.join(root, f"{name}.csv") for name, _ in SPLITS}
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker) and open(marker).read().strip() == f"{n_images} {seed}":
        return csvs
    rng = np.random.default_rng(seed)
    digits = load_digits()
    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    order = rng.permutation(n_images)
    noise = _noise_bank(rng)
    rows = []
    for i in tqdm(range(n_images), desc="demo images", unit="img", disable=not progress):
        d = int(order[i] % len(digits.images))
        img = _render(digits.images[d], rng, noise)
        base = os.path.join(img_dir, f"{i:06d}_d{digits.target[d]}")
        if i < len(ODD_KINDS):
            name = _save_odd(img, ODD_KINDS[i], base)
        elif rng.random() < 0.05:
            name = base + ".png"
            img.save(name, compress_level=1)
        else:
            name = base + ".jpg"
            img.save(name, quality=int(rng.integers(80, 96)))
        rows.append((os.path.relpath(name, root), int(digits.target[d] >= 5)))
    # Broken files, listed like any other image: extraction must record and skip them.
    buf = io.BytesIO()
    _render(digits.images[0], rng, noise).save(buf, format="JPEG", quality=90)
    broken = {BROKEN[0]: buf.getvalue()[: len(buf.getvalue()) * 2 // 5], BROKEN[1]: b"this is not an image\n",
              BROKEN[2]: b""}
    for name, data in broken.items():
        with open(os.path.join(img_dir, name), "wb") as fh:
            fh.write(data)
    idx = rng.permutation(len(rows))
    start = 0
    for k, (split, share) in enumerate(SPLITS):
        stop = len(rows) if k == len(SPLITS) - 1 else start + int(round(share * len(rows)))
        with open(csvs[split], "w") as fh:
            for j in sorted(idx[start:stop]):
                fh.write(f"{rows[j][0]},{rows[j][1]}\n")
            if split == "train":
                for name in BROKEN:
                    fh.write(f"images/{name},0\n")
        start = stop
    with open(marker, "w") as fh:
        fh.write(f"{n_images} {seed}\n")
    return csvs
