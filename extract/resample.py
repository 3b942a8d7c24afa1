"""PIL's antialiased resize as two matrix products, for batches of images on a GPU.

PIL resizes an 8-bit image in two separable passes (see :func:`horizontal_first`), each
output sample a weighted sum of the input samples under the filter's support, with the
weights normalised and quantised to 22-bit fixed point, and the intermediate image
rounded back to 8 bits (``libImaging/Resample.c``: ``precompute_coeffs``,
``normalize_coeffs_8bpc``). The weights of one pass form a (mostly zero) matrix, so a
pass is one GEMM on the tensor cores, and a center crop is simply fewer matrix rows:
only the output pixels that are kept are ever computed.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, interpolation: str, start: int = 0, length: int | None = None
                ) -> np.ndarray:
    """Weights of one PIL resize pass, ``in_size -> out_size`` samples, as an
    ``(length, in_size)`` float64 matrix holding the rows ``start .. start+length`` of the
    output (a crop). Values are PIL's quantised weights, ``k / 2**22``."""
    fn, support = FILTERS[interpolation]
    length = out_size - start if length is None else length
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    m = np.zeros((length, in_size), dtype=np.float64)
    for row, xx in enumerate(range(start, start + length)):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size)
        w = fn((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        q = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)), np.trunc(0.5 + w * (1 << PRECISION_BITS)))
        m[row, xmin:xmax] = q / (1 << PRECISION_BITS)
    return m


def _pillow_major() -> int:
    try:
        import PIL

        return int(PIL.__version__.split(".")[0])
    except (ImportError, ValueError):
        return 0


def horizontal_first(h: int, w: int, nh: int, nw: int) -> bool:
    """The order of PIL's passes, which changes its rounding: Pillow >= 13 runs the
    vertical pass first when the height shrinks more than twice as much as the width
    (``ImagingResampleInner``); older Pillow always starts horizontally."""
    if _PILLOW_MAJOR < 13:
        return True
    return not (h - nh > 0 and h - nh > (w - nw) * 2)


_PILLOW_MAJOR = _pillow_major()


def round_like_pil(x):
    """PIL's ``clip8((sum + 2**21) >> 22)``: round half up, clamp to 0..255 (in place)."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def crop_box(size: int, crop: int | None) -> tuple[int, int]:
    """(start, length) of torchvision's center crop along one axis."""
    if crop is None:
        return 0, size
    return int(round((size - crop) / 2.0)), crop
