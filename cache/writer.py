"""Crash-safe writing of one cache shard.

A shard is written as ``<name>.h5.partial`` and renamed to ``<name>.h5`` only after
every row is flushed, the ``complete`` attribute is set and the file is fsynced. A
killed writer leaves at most a ``.partial`` file, which readers never open.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from cache.format import FORMAT_NAME, FORMAT_VERSION, PARTIAL_SUFFIX, canonical_json

_STR = h5py.string_dtype(encoding="utf-8")
_CHUNK_ROWS = 1024
# Rows gathered in memory before one write per dataset: each h5py write (resize + assign)
# costs a fixed ~0.5 ms per dataset, nine datasets per write, so 512-row batches spent most
# of the writer's time there (benchmarks/writer_bench.py). At most this many rows, and at
# most _FLUSH_BYTES of features.
_FLUSH_ROWS = 4096
_FLUSH_BYTES = 32 << 20
_STR_COLUMNS = ("sha256", "paths", "source", "group")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Append rows to one shard; :meth:`finish` publishes it atomically.

    Parameters
    ----------
    path : str
        Final path of the shard (``.../shard-00000.h5``).
    feature_dims : mapping of str to int
        Feature set name -> dimension, e.g. ``{"cls": 768, "patch_mean": 768}``.
    provenance : dict
        Backbone, preprocessing, dtype, library versions (JSON-serialisable).
    fingerprint : str
        :func:`cache.format.fingerprint_of` of ``provenance``.
    plan : dict
        ``plan_id``, ``input_start``, ``input_stop``, ``num_inputs`` of this shard.
    classes : sequence of str, optional
        Class names, index = label value.
    feature_dtype : str
        ``"float16"`` (default) or ``"float32"``.
    flush_rows : int, optional
        Rows gathered in memory (copied) before they are written, one write per dataset
        (default: 4096, fewer where their features would take more than 32 MB); a call
        with at least that many rows is written at once.
    """

    def __init__(
        self,
        path: str,
        *,
        feature_dims: Mapping[str, int],
        provenance: dict[str, Any],
        fingerprint: str,
        plan: Mapping[str, Any],
        classes: Sequence[str] | None = None,
        feature_dtype: str = "float16",
        flush_rows: int | None = None,
    ) -> None:
        self.path = path
        self.partial_path = path + PARTIAL_SUFFIX
        self._dtype = np.dtype(feature_dtype)
        self._f = h5py.File(self.partial_path, "w")
        f = self._f
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = False
        f.attrs["fingerprint"] = fingerprint
        f.attrs["provenance"] = canonical_json(provenance)
        f.attrs["classes"] = json.dumps(list(classes) if classes is not None else None)
        for key in ("plan_id", "input_start", "input_stop", "num_inputs"):
            f.attrs[key] = plan[key]
        feats = f.create_group("features")
        for name, dim in feature_dims.items():
            feats.create_dataset(
                name, shape=(0, int(dim)), maxshape=(None, int(dim)), dtype=self._dtype,
                chunks=(_CHUNK_ROWS, int(dim)),
            )
        for name, dtype in (("labels", np.int64), ("index", np.int64), ("sha256", "S64"),
                            ("paths", _STR), ("source", _STR), ("group", _STR)):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(_CHUNK_ROWS,))
        fail = f.create_group("failures")
        fail.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
        fail.create_dataset("path", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        fail.create_dataset("reason", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        self.rows = 0
        if flush_rows is None:
            row_bytes = max(1, sum(int(d) for d in feature_dims.values()) * self._dtype.itemsize)
            flush_rows = min(_FLUSH_ROWS, _FLUSH_BYTES // row_bytes)
        self._flush_rows = max(1, int(flush_rows))
        self._pending = 0  # rows in the buffers below, not yet written
        self._buf = {name: np.empty((self._flush_rows, int(dim)), dtype=self._dtype)
                     for name, dim in feature_dims.items()}
        self._buf_int = {name: np.empty(self._flush_rows, dtype=np.int64) for name in ("labels", "index")}
        self._buf_str: dict[str, list[str]] = {name: [] for name in _STR_COLUMNS}
        self.failures = 0

    @staticmethod
    def _append(ds: h5py.Dataset, values: Any) -> None:
        n0 = ds.shape[0]
        values = np.asarray(values) if not isinstance(values, list) else values
        n = len(values)
        if n == 0:
            return
        ds.resize(n0 + n, axis=0)
        ds[n0:n0 + n] = values

    def add_rows(
        self,
        *,
        features: Mapping[str, np.ndarray],
        labels: Sequence[int],
        paths: Sequence[str],
        sha256: Sequence[str],
        source: Sequence[str],
        group: Sequence[str],
        index: Sequence[int],
    ) -> None:
        """Append ``n`` rows; every argument has length ``n`` (features ``(n, D)``)."""
        n = len(index)
        feats = self._f["features"]
        if set(features) != set(feats.keys()):
            raise ValueError(f"feature sets {sorted(features)} != {sorted(feats.keys())}")
        arrays = {}
        for name, arr in features.items():
            arr = np.asarray(arr)
            if arr.shape != (n, feats[name].shape[1]):
                raise ValueError(f"features[{name!r}] has shape {arr.shape}, want {(n, feats[name].shape[1])}")
            arrays[name] = arr
        columns = {"labels": labels, "sha256": sha256, "paths": paths, "source": source, "group": group}
        for name, vals in columns.items():
            if len(vals) != n:
                raise ValueError(f"{name} has {len(vals)} values, want {n} (one per index)")
        if self._pending + n > self._flush_rows:
            self._flush()
        if n >= self._flush_rows:  # large enough to be written as it is
            self._write(arrays, np.asarray(labels, dtype=np.int64), np.asarray(index, dtype=np.int64),
                        {name: columns[name] for name in _STR_COLUMNS})
        else:
            a, b = self._pending, self._pending + n
            for name, arr in arrays.items():
                self._buf[name][a:b] = arr
            self._buf_int["labels"][a:b] = labels
            self._buf_int["index"][a:b] = index
            for name in _STR_COLUMNS:
                self._buf_str[name].extend(columns[name])
            self._pending = b
        self.rows += n

    def _flush(self) -> None:
        """Write the buffered rows, one write per dataset."""
        p = self._pending
        if p == 0:
            return
        self._write({name: buf[:p] for name, buf in self._buf.items()}, self._buf_int["labels"][:p],
                    self._buf_int["index"][:p], self._buf_str)
        self._buf_str = {name: [] for name in _STR_COLUMNS}
        self._pending = 0

    def _write(self, features: Mapping[str, np.ndarray], labels: np.ndarray, index: np.ndarray,
               strings: Mapping[str, Sequence[str]]) -> None:
        feats = self._f["features"]
        for name, arr in features.items():
            self._append(feats[name], arr.astype(self._dtype, copy=False))
        self._append(self._f["labels"], labels)
        self._append(self._f["index"], index)
        self._append(self._f["sha256"], np.asarray([s.encode("ascii") for s in strings["sha256"]], dtype="S64"))
        for name in ("paths", "source", "group"):
            self._append(self._f[name], list(strings[name]))

    def add_failure(self, index: int, path: str, reason: str) -> None:
        """Record an input that could not be turned into a row."""
        g = self._f["failures"]
        self._append(g["index"], np.asarray([index], dtype=np.int64))
        self._append(g["path"], [path])
        self._append(g["reason"], [reason])
        self.failures += 1

    def finish(self) -> str:
        """Mark complete, flush, fsync and atomically rename; returns the final path."""
        self._flush()
        self._f.attrs["rows"] = self.rows
        self._f.attrs["complete"] = True
        self._f.flush()
        self._f.close()
        with open(self.partial_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial_path, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def abort(self) -> None:
        """Close and remove the partial file."""
        try:
            self._f.close()
        finally:
            if os.path.exists(self.partial_path):
                os.remove(self.partial_path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
