"""Open one shard, a directory of shards, or several of either as one cache.

Rows keep a stable order: arguments in the order given; within a directory, shards
in input order. Shards whose fingerprints differ are refused, naming both files.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from cache.errors import Stage1Error
from cache.format import FORMAT_NAME, FORMAT_VERSION, SHARD_SUFFIX, short


@dataclass(frozen=True)
class ShardInfo:
    path: str  # the shard file
    rows: int  # rows of features it holds
    plan_id: str  # id of the extraction plan (input list) it belongs to
    input_start: int  # first input index it covers
    input_stop: int  # one past the last input index it covers
    num_inputs: int  # inputs in the whole plan
    fingerprint: str


def _shard_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*" + SHARD_SUFFIX)))
        if not files:
            partial = glob.glob(os.path.join(path, "*" + SHARD_SUFFIX + ".partial"))
            hint = (" (only unfinished .partial shards: re-run the same `stage1 extract` command to finish)"
                    if partial else "; point at a cache written by `stage1 extract`")
            raise Stage1Error(f"{path}: no cache shards (*.h5) in this directory{hint}")
        return files
    if not os.path.exists(path):
        raise Stage1Error(f"{path}: no such cache file or directory; check the path")
    return [path]


def read_shard_info(path: str) -> ShardInfo:
    """Open ``path``, check it is a complete shard of a known format, return its header."""
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format") != FORMAT_NAME:
                raise Stage1Error(f"{path}: not a stage1 feature cache (no '{FORMAT_NAME}' format attribute)")
            if int(a.get("format_version", -1)) > FORMAT_VERSION:
                raise Stage1Error(
                    f"{path}: cache format version {int(a['format_version'])} is newer than this "
                    f"stage1 reads ({FORMAT_VERSION}); upgrade stage1-pro")
            if not bool(a.get("complete", False)):
                raise Stage1Error(f"{path}: shard is incomplete (its writer did not finish); "
                                  "re-run the `stage1 extract` command that wrote it")
            return ShardInfo(path, int(a["rows"]), str(a["plan_id"]), int(a["input_start"]),
                             int(a["input_stop"]), int(a["num_inputs"]), str(a["fingerprint"]))
    except OSError as e:
        raise Stage1Error(f"{path}: cannot be read as HDF5 ({e.__class__.__name__}: {e}); "
                          "the file is damaged or not a cache: re-create it with `stage1 extract`") from None


def plan_coverage(shards: Sequence[ShardInfo]) -> dict[str, tuple[int, int, list[tuple[int, int]]]]:
    """Per plan id: (inputs covered, inputs in plan, missing ranges)."""
    out = {}
    for pid in dict.fromkeys(s.plan_id for s in shards):
        mine = sorted((s.input_start, s.input_stop) for s in shards if s.plan_id == pid)
        total = next(s.num_inputs for s in shards if s.plan_id == pid)
        missing, pos, covered = [], 0, 0
        for a, b in mine:
            if a > pos:
                missing.append((pos, a))
            covered += b - max(a, pos) if b > pos else 0
            pos = max(pos, b)
        if pos < total:
            missing.append((pos, total))
        out[pid] = (covered, total, missing)
    return out


class FeatureCache:
    """A read-only merged view over complete shards that share one fingerprint.

    Columns load lazily and are kept once loaded. Use as a context manager or call
    :meth:`close` to release file handles.
    """

    def __init__(self, shards: Sequence[ShardInfo]) -> None:
        if not shards:
            raise Stage1Error("no cache shards given")
        self.shards = list(shards)
        first = self.shards[0]
        for s in self.shards[1:]:
            if s.fingerprint != first.fingerprint:
                raise Stage1Error(
                    f"caches do not match: {first.path} has fingerprint {short(first.fingerprint)} "
                    f"but {s.path} has {short(s.fingerprint)} (different backbone, weights or "
                    "preprocessing); extract both with the same --backbone and preprocessing")
        self.fingerprint = first.fingerprint
        self._files = [h5py.File(s.path, "r") for s in self.shards]
        f0 = self._files[0]
        self.provenance: dict[str, Any] = json.loads(f0.attrs["provenance"])
        self.classes: list[str] | None = json.loads(f0.attrs.get("classes", "null"))
        self.feature_sets: dict[str, int] = {k: int(v.shape[1]) for k, v in f0["features"].items()}
        for s, f in zip(self.shards[1:], self._files[1:], strict=True):
            sets = {k: int(v.shape[1]) for k, v in f["features"].items()}
            if sets != self.feature_sets:
                raise Stage1Error(f"{s.path}: feature sets {sets} differ from {first.path}'s "
                                  f"{self.feature_sets}; re-extract one of them")
        self._offsets = np.cumsum([0] + [s.rows for s in self.shards])
        self._columns: dict[str, np.ndarray] = {}

    # -- basic facts -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def paths_on_disk(self) -> list[str]:
        return [s.path for s in self.shards]

    def describe_source(self) -> str:
        return self.shards[0].path if len(self.shards) == 1 else \
            f"{os.path.dirname(self.shards[0].path) or '.'} ({len(self.shards)} shards)"

    # -- columns ---------------------------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            parts = [f[name][()] for f in self._files]
            col = np.concatenate(parts) if parts else np.zeros(0)
            if col.dtype.kind == "O" or name in ("paths", "source", "group"):
                col = np.array([x.decode() if isinstance(x, bytes) else x for x in col], dtype=object)
            elif col.dtype.kind == "S":
                col = col.astype(str)
            self._columns[name] = col
        return self._columns[name]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64; -1 marks unlabelled rows."""
        return self._column("labels")

    @property
    def paths(self) -> np.ndarray:
        return self._column("paths")

    @property
    def sha256(self) -> np.ndarray:
        return self._column("sha256")

    @property
    def source(self) -> np.ndarray:
        return self._column("source")

    @property
    def group(self) -> np.ndarray:
        return self._column("group")

    @property
    def index(self) -> np.ndarray:
        return self._column("index")

    def has_labels(self) -> bool:
        return bool(len(self)) and bool(np.all(self.labels >= 0))

    def _check_set(self, name: str) -> None:
        if name not in self.feature_sets:
            raise Stage1Error(f"{self.describe_source()}: no feature set {name!r}; "
                              f"this cache has {sorted(self.feature_sets)}")

    #: rows per HDF5 read when loading a whole feature set (32 MB at 1024 float16 columns)
    READ_ROWS = 16384

    def features(self, name: str, *, dtype: Any = np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """All rows of feature set ``name`` as one ``(N, D)`` array of ``dtype``.

        ``out``: an existing ``(N, D)`` array to fill instead (e.g. a column block of a
        wider matrix); its dtype wins. Rows are read :attr:`READ_ROWS` at a time, so the
        peak memory is the result plus one block, not plus a stored-dtype copy of a shard.
        """
        self._check_set(name)
        shape = (len(self), self.feature_sets[name])
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}; feature set {name!r} needs {shape}")
        for start, block in self.iter_feature_chunks(name, self.READ_ROWS):
            out[start:start + len(block)] = block
            del block  # before the next read, so that only one block is alive
        return out

    def iter_feature_chunks(self, name: str, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)`` pieces of feature set ``name`` in row order."""
        self._check_set(name)
        for f, a, b in zip(self._files, self._offsets[:-1], self._offsets[1:], strict=True):
            ds = f["features"][name]
            for s in range(0, b - a, chunk_rows):
                yield int(a + s), ds[s:min(s + chunk_rows, b - a)]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Inputs that could not be decoded: ``{"index", "path", "reason"}`` each."""
        out = []
        for f in self._files:
            g = f["failures"]
            for i, p, r in zip(g["index"][()], g["path"][()], g["reason"][()], strict=True):
                out.append({"index": int(i), "path": p.decode() if isinstance(p, bytes) else p,
                            "reason": r.decode() if isinstance(r, bytes) else r})
        return out

    def close(self) -> None:
        for f in self._files:
            try:
                f.close()
            except Exception:  # already closed
                pass
        self._files = []

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(paths: str | Sequence[str], *, allow_partial: bool = False) -> FeatureCache:
    """Open shards, directories of shards, or both, as one :class:`FeatureCache`.

    Parameters
    ----------
    paths : str or sequence of str
        Shard files and/or directories written by ``stage1 extract``/``cache merge``.
    allow_partial : bool, default False
        Accept an extraction whose shards do not yet cover all its inputs (a run still
        going or interrupted). By default that is an error telling how to finish it.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [os.fspath(paths)]
    infos: list[ShardInfo] = []
    for p in paths:
        found = [read_shard_info(f) for f in _shard_files(os.fspath(p))]
        plan_order = {pid: k for k, pid in enumerate(dict.fromkeys(s.plan_id for s in found))}
        found.sort(key=lambda s: (plan_order[s.plan_id], s.input_start))
        infos.extend(found)
    seen: dict[str, str] = {}
    for s in infos:
        key = os.path.realpath(s.path)
        if key in seen:
            raise Stage1Error(f"{s.path}: the same shard is given twice; list each cache once")
        seen[key] = s.path
    if not allow_partial:
        for pid, (covered, total, missing) in plan_coverage(infos).items():
            if covered != total:
                where = os.path.dirname(next(s.path for s in infos if s.plan_id == pid)) or "."
                a, b = missing[0]
                raise Stage1Error(
                    f"{where}: cache is incomplete: its shards cover {covered} of {total} inputs "
                    f"(inputs {a}..{b - 1} missing); re-run the same `stage1 extract` command to finish it")
    return FeatureCache(infos)
