"""Deterministic, leakage-free split of validation rows into ``val_select`` and ``val_calib``.

Each row's *group key* (the cache's ``/group``: an explicit group column, else the
image's content hash) is hashed with the seed; the hash decides the side. Rows of one
group never straddle the split, and the result is the same on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from cache.errors import Stage1Error


def group_uniform(groups: Sequence[str], seed: int) -> np.ndarray:
    """A number in [0, 1) per group key, from sha256(seed:key)."""
    out = np.empty(len(groups), dtype=np.float64)
    prefix = f"{seed}:".encode()
    for i, g in enumerate(groups):
        out[i] = int.from_bytes(hashlib.sha256(prefix + str(g).encode()).digest()[:8], "big") / 2.0**64
    return out


def split_select_calib(groups: Sequence[str], *, ratio: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(val_select, val_calib)``; a share ``ratio`` of groups goes to select."""
    if not 0.0 < ratio < 1.0:
        raise Stage1Error(f"--val-select-ratio {ratio} must lie strictly between 0 and 1")
    u = group_uniform(groups, seed)
    sel = np.flatnonzero(u < ratio)
    cal = np.flatnonzero(u >= ratio)
    if len(sel) == 0 or len(cal) == 0:
        raise Stage1Error(f"splitting {len(groups)} validation rows at ratio {ratio} left "
                          f"{'val_select' if len(sel) == 0 else 'val_calib'} empty; give more validation rows")
    return sel, cal
