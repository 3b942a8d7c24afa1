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
        for name, arr in features.items():
            arr = np.asarray(arr)
            if arr.shape != (n, feats[name].shape[1]):
                raise ValueError(f"features[{name!r}] has shape {arr.shape}, want {(n, feats[name].shape[1])}")
            self._append(feats[name], arr.astype(self._dtype, copy=False))
        self._append(self._f["labels"], np.asarray(labels, dtype=np.int64))
        self._append(self._f["index"], np.asarray(index, dtype=np.int64))
        self._append(self._f["sha256"], np.asarray([s.encode("ascii") for s in sha256], dtype="S64"))
        for name, vals in (("paths", paths), ("source", source), ("group", group)):
            self._append(self._f[name], list(vals))
        self.rows += n

    def add_failure(self, index: int, path: str, reason: str) -> None:
        """Record an input that could not be turned into a row."""
        g = self._f["failures"]
        self._append(g["index"], np.asarray([index], dtype=np.int64))
        self._append(g["path"], [path])
        self._append(g["reason"], [reason])
        self.failures += 1

    def finish(self) -> str:
        """Mark complete, flush, fsync and atomically rename; returns the final path."""
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
