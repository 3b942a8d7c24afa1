"""Cached features as training data: one in-memory matrix, or rows streamed from HDF5.

In memory (the fast path): the needed feature sets are read once into one float32
``(N, D_total)`` tensor and batches are sliced from it, no per-sample Dataset. When the
matrix would exceed ``--max-memory``, rows stream from the shards in shuffled blocks
of whole HDF5 chunks, so memory stays bounded by one block.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cache.errors import Stage1Error
from cache.format import short
from cache.reader import FeatureCache, open_cache

FEATURE_ORDER = ("cls", "patch_mean")


def parse_bytes(spec: str | None) -> int | None:
    """'1GB', '512MiB', '2e9' -> bytes; None stays None."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", str(spec))
    if not m:
        raise Stage1Error(f"--max-memory {spec!r}: give a size like '1GB' or '512MB'")
    unit = (m.group(2) or "").upper().replace("IB", "B")
    mult = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if unit not in mult:
        raise Stage1Error(f"--max-memory {spec!r}: unknown unit {m.group(2)!r}")
    return int(float(m.group(1)) * mult[unit])


def needed_sets(feature_choices: Sequence[str]) -> list[str]:
    """Feature sets used by any choice ('cls+patch_mean' -> both), in canonical order."""
    used = {p for c in feature_choices for p in c.split("+")}
    unknown = used - set(FEATURE_ORDER)
    if unknown:
        raise Stage1Error(f"--features {sorted(unknown)}: unknown feature set; use cls, patch_mean or cls+patch_mean")
    return [s for s in FEATURE_ORDER if s in used]


def columns_of(cache: FeatureCache, sets: Sequence[str]) -> dict[str, tuple[int, int]]:
    cols, pos = {}, 0
    for s in sets:
        if s not in cache.feature_sets:
            raise Stage1Error(f"{cache.describe_source()}: feature set {s!r} is not in this cache "
                              f"(it has {sorted(cache.feature_sets)}); re-extract with --feature-sets {s} "
                              "or choose another --features")
        cols[s] = (pos, pos + cache.feature_sets[s])
        pos += cache.feature_sets[s]
    return cols


def load_matrix(cache: FeatureCache, sets: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
    """``(N, D_total)`` float32 of ``sets`` side by side (optionally only ``rows``), each set
    read block by block straight into its columns: peak memory ~ the matrix itself."""
    dims = [cache.feature_sets.get(s, 0) for s in sets]  # a missing set: features() names it
    x = np.empty((len(cache), sum(dims)), dtype=np.float32)
    lo = 0
    for s, d in zip(sets, dims, strict=True):
        cache.features(s, out=x[:, lo:lo + d])
        lo += d
    return x if rows is None else x[rows]


def stored_row_bytes(cache: FeatureCache, sets: Sequence[str]) -> int:
    """Bytes of one row of ``sets`` as the shards store them (float16 by default)."""
    f0 = cache._files[0]["features"] if cache._files else {}
    return sum(f0[s].dtype.itemsize * f0[s].shape[1] for s in sets if s in f0)


def in_memory_bytes(cache: FeatureCache, sets: Sequence[str]) -> int:
    """Peak bytes of holding ``sets`` in memory: the float32 matrix (:func:`load_matrix`)
    plus the one stored-dtype block of rows it is read through."""
    matrix = len(cache) * 4 * sum(cache.feature_sets.get(s, 0) for s in sets)
    return matrix + min(len(cache), cache.READ_ROWS) * stored_row_bytes(cache, sets)


def open_labelled(paths: Sequence[str], what: str) -> FeatureCache:
    c = open_cache(list(paths))
    if len(c) == 0:
        raise Stage1Error(f"{c.describe_source()}: the {what} cache has no rows")
    unl = int(np.sum(c.labels < 0))
    if unl:
        raise Stage1Error(f"{c.describe_source()}: the {what} cache has {unl} unlabelled rows (label -1); "
                          f"{what} needs labels: extract it with --labels")
    return c


def check_same_fingerprint(a: FeatureCache, b: FeatureCache, what_a: str, what_b: str) -> None:
    if a.fingerprint != b.fingerprint:
        raise Stage1Error(
            f"caches do not match: {what_a} {a.describe_source()} has fingerprint {short(a.fingerprint)} but "
            f"{what_b} {b.describe_source()} has {short(b.fingerprint)} (different backbone, weights or "
            "preprocessing); extract both with the same --backbone and preprocessing")


class InMemoryRows:
    """All rows in one tensor; an epoch is a random permutation sliced into batches."""

    def __init__(self, x: np.ndarray, y: np.ndarray, device: torch.device) -> None:
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        self.n = len(y)

    def batches(self, gen: torch.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(self.n, generator=gen).to(self.x.device)
        for s in range(0, self.n, batch_size):
            idx = perm[s:s + batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


class StreamedRows:
    """Rows read from HDF5 shards block by block, blocks in shuffled order each epoch.

    A block is ``block_rows`` consecutive rows (a multiple of the 1024-row HDF5 chunk),
    read in its stored dtype and shuffled within the block; batches are converted to
    float32 one at a time. Peak memory ~ three stored-dtype copies of one block
    (the read, the join of feature sets, the shuffled gather) = ``budget_bytes / 2``.
    """

    def __init__(self, cache: FeatureCache, sets: Sequence[str], device: torch.device, *, budget_bytes: int) -> None:
        self.cache, self.sets, self.device = cache, list(sets), device
        self.y = np.asarray(cache.labels, dtype=np.int64)
        self.n = len(self.y)
        row_bytes = stored_row_bytes(cache, sets)
        self.block_rows = max(1024, (budget_bytes // 6 // row_bytes) // 1024 * 1024)
        self.blocks = []  # (file index, start row in file, stop row in file, global offset)
        for fi, (f, off) in enumerate(zip(cache._files, cache._offsets[:-1], strict=True)):
            rows = f["labels"].shape[0]
            for a in range(0, rows, self.block_rows):
                self.blocks.append((fi, a, min(a + self.block_rows, rows), int(off)))

    def batches(self, gen: torch.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.blocks), generator=gen).tolist()
        carry_x = carry_y = None
        for bi in order:
            fi, a, b, off = self.blocks[bi]
            f = self.cache._files[fi]
            parts = [f["features"][s][a:b] for s in self.sets]
            block = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            del parts
            perm = torch.randperm(b - a, generator=gen)
            x = torch.from_numpy(block)[perm]  # shuffled, still in the stored dtype
            del block
            y = torch.from_numpy(self.y[off + a:off + b])[perm]
            pos = 0
            if carry_x is not None:
                need = batch_size - len(carry_y)
                yield (torch.cat([carry_x, x[:need].float()]).to(self.device),
                       torch.cat([carry_y, y[:need]]).to(self.device))
                pos = need
                carry_x = carry_y = None
            while pos + batch_size <= len(y):
                yield x[pos:pos + batch_size].float().to(self.device), y[pos:pos + batch_size].to(self.device)
                pos += batch_size
            if pos < len(y):
                carry_x, carry_y = x[pos:].float(), y[pos:]
            del x, y
        if carry_x is not None:
            yield carry_x.to(self.device), carry_y.to(self.device)
