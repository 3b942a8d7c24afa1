"""`stage1 cache info | verify | merge`: look into, check and combine caches."""

from __future__ import annotations

import collections
import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from cache.errors import Stage1Error
from cache.format import PARTIAL_SUFFIX, SHARD_SUFFIX, short
from cache.reader import _shard_files, open_cache, plan_coverage, read_shard_info
from cache.writer import ShardWriter

_HEX64 = re.compile(rb"^[0-9a-f]{64}$")


def cache_info(paths: str | Sequence[str]) -> dict[str, Any]:
    """What a cache holds: rows, feature sets, labels, sources, failures, provenance."""
    with open_cache(paths, allow_partial=True) as c:
        cov = plan_coverage(c.shards)
        labels = c.labels
        fails = c.failures
        return {
            "paths": c.paths_on_disk, "shards": len(c.shards), "rows": len(c),
            "feature_sets": dict(c.feature_sets), "classes": c.classes,
            "label_counts": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)},
            "sources": {str(k): int(v) for k, v in collections.Counter(c.source.tolist()).items()},
            "failures": len(fails), "failure_examples": fails[:10],
            "complete": all(cv == tot for cv, tot, _ in cov.values()),
            "coverage": {pid[:12]: {"covered": cv, "inputs": tot} for pid, (cv, tot, _) in cov.items()},
            "fingerprint": c.fingerprint, "provenance": c.provenance,
        }


def format_info(info: dict[str, Any]) -> str:
    p = info["provenance"]
    pre = p["preprocessing"]
    bb = p["backbone"]
    lines = [
        f"cache        {info['paths'][0] if info['shards'] == 1 else os.path.dirname(info['paths'][0])} "
        f"({info['shards']} shard{'s' if info['shards'] != 1 else ''}{'' if info['complete'] else ', INCOMPLETE'})",
        f"rows         {info['rows']}",
        "features     " + ", ".join(f"{k} ({d}-d {p['feature_dtype']})" for k, d in info["feature_sets"].items()),
        "labels       " + ", ".join(
            f"{'unlabelled' if k == '-1' else (info['classes'][int(k)] if info.get('classes') else k)}: {v}"
            for k, v in info["label_counts"].items()),
        "sources      " + ", ".join(f"{k}: {v}" for k, v in info["sources"].items()),
        f"failures     {info['failures']}" + "".join(
            f"\n               {f['path']}: {f['reason']}" for f in info["failure_examples"][:5]),
        f"backbone     {p.get('backbone_source', {}).get('spec', '?')} ({bb['library']}, "
        f"{bb['embed_dim']}-d, weights sha256 {bb['weights_sha256'][:12]})",
        f"preprocess   {pre['preset']}: resize {pre['resize']} {pre['interpolation']}"
        + (f", center-crop {pre['crop']}" if pre.get("crop") else "") + f", decoder {pre['decoder']}",
        f"fingerprint  {info['fingerprint']}",
        "libraries    " + ", ".join(f"{k} {v}" for k, v in p.get("libraries", {}).items()),
    ]
    return "\n".join(lines)


def verify_cache(paths: str | Sequence[str], *, chunk_rows: int = 65536) -> list[str]:
    """Every problem found, one line each; an empty list means the cache is sound.

    Checks: each shard opens, is complete and of a known format; all datasets agree on
    the row count; features hold no NaN/Inf; hashes are well formed; row indices lie
    in the shard's input range and rows + failures account for every input; all
    fingerprints agree; shards cover their extraction plan without gaps or overlap.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [os.fspath(paths)]
    problems: list[str] = []
    infos = []
    for p in paths:
        try:
            files = _shard_files(p)
        except Stage1Error as e:
            problems.append(str(e))
            continue
        if os.path.isdir(p):
            for partial in sorted(f for f in os.listdir(p) if f.endswith(SHARD_SUFFIX + PARTIAL_SUFFIX)):
                problems.append(f"{os.path.join(p, partial)}: unfinished shard (a run was interrupted); "
                                "re-run the extract command to finish it")
        for f in files:
            try:
                infos.append(read_shard_info(f))
            except Stage1Error as e:
                problems.append(str(e))
    for s in infos:
        problems += _verify_shard(s.path, chunk_rows)
    if infos:
        fps = collections.defaultdict(list)
        for s in infos:
            fps[s.fingerprint].append(s.path)
        if len(fps) > 1:
            desc = "; ".join(f"{short(fp)}: {', '.join(v[:2])}{' ...' if len(v) > 2 else ''}" for fp, v in fps.items())
            problems.append(f"shards have different fingerprints ({desc}); they cannot be read as one cache")
        for pid, (cv, tot, missing) in plan_coverage(infos).items():
            if cv != tot:
                problems.append(f"extraction {pid[:12]}: shards cover {cv} of {tot} inputs; missing input ranges "
                                + ", ".join(f"{a}..{b - 1}" for a, b in missing[:5]))
        seen = collections.defaultdict(list)
        for s in infos:
            seen[s.plan_id].append((s.input_start, s.input_stop, s.path))
        for ranges in seen.values():
            ranges.sort()
            for (_, b0, p0), (a1, _, p1) in zip(ranges, ranges[1:], strict=False):
                if a1 < b0:
                    problems.append(f"{p1}: overlaps {p0} (inputs {a1}..{b0 - 1} in both)")
    return problems


def _verify_shard(path: str, chunk_rows: int) -> list[str]:
    out = []
    with h5py.File(path, "r") as f:
        a = f.attrs
        rows = int(a["rows"])
        lengths = {k: f[k].shape[0] for k in ("labels", "paths", "sha256", "source", "group", "index")}
        lengths.update({f"features/{k}": v.shape[0] for k, v in f["features"].items()})
        for k, v in lengths.items():
            if v != rows:
                out.append(f"{path}: dataset {k} has {v} rows, the shard says {rows}")
        for k, ds in f["features"].items():
            for s in range(0, ds.shape[0], chunk_rows):
                block = ds[s:s + chunk_rows]
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    out.append(f"{path}: features/{k} row {s + int(np.argmax(bad))} holds NaN/Inf "
                               f"({int(bad.sum())} rows in rows {s}..{s + len(block) - 1}); re-extract this shard")
                    break
        if not all(_HEX64.match(h) for h in f["sha256"][()]):
            out.append(f"{path}: sha256 column holds a malformed digest")
        idx = f["index"][()]
        fidx = f["failures/index"][()]
        start, stop = int(a["input_start"]), int(a["input_stop"])
        allidx = np.concatenate([idx, fidx])
        if allidx.size and (allidx.min() < start or allidx.max() >= stop):
            out.append(f"{path}: row indices outside the shard's input range {start}..{stop - 1}")
        if len(np.unique(allidx)) != allidx.size:
            out.append(f"{path}: an input appears twice among rows and failures")
        if allidx.size != stop - start:
            out.append(f"{path}: rows ({idx.size}) + failures ({fidx.size}) = {allidx.size}, "
                       f"but the shard covers {stop - start} inputs")
        labels = f["labels"][()]
        if labels.size and labels.min() < -1:
            out.append(f"{path}: label {int(labels.min())} is invalid (labels are >= 0, or -1 = unlabelled)")
    return out


def merge_caches(paths: Sequence[str], out: str, *, chunk_rows: int = 16384, overwrite: bool = False) -> dict[str, Any]:
    """Copy the rows of ``paths`` (one merged view) into one shard file ``out``, atomically."""
    if os.path.exists(out) and not overwrite:
        raise Stage1Error(f"{out}: already exists; choose another --out (merge never overwrites)")
    with open_cache(paths) as c:
        plan_ids = sorted({s.plan_id for s in c.shards})
        plan_id = plan_ids[0] if len(plan_ids) == 1 else hashlib.sha256("+".join(plan_ids).encode()).hexdigest()
        sizes = [s.input_stop - s.input_start for s in c.shards]
        # Inputs are renumbered so that the merged file covers 0..total-1 in row order.
        offsets = np.cumsum([0] + sizes)
        total = int(offsets[-1])
        dtype = c.provenance["feature_dtype"]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with ShardWriter(out, feature_dims=c.feature_sets, provenance=c.provenance, fingerprint=c.fingerprint,
                         plan={"plan_id": plan_id, "input_start": 0, "input_stop": total, "num_inputs": total},
                         classes=c.classes, feature_dtype=dtype) as w:
            for s, f, off in zip(c.shards, c._files, offsets[:-1], strict=True):
                shift = int(off) - s.input_start
                for r in range(0, s.rows, chunk_rows):
                    sl = slice(r, min(r + chunk_rows, s.rows))
                    w.add_rows(features={k: f["features"][k][sl] for k in c.feature_sets},
                               labels=f["labels"][sl], paths=[_s(x) for x in f["paths"][sl]],
                               sha256=[_s(x) for x in f["sha256"][sl]], source=[_s(x) for x in f["source"][sl]],
                               group=[_s(x) for x in f["group"][sl]], index=f["index"][sl] + shift)
                g = f["failures"]
                for i, p, r in zip(g["index"][()], g["path"][()], g["reason"][()], strict=True):
                    w.add_failure(int(i) + shift, _s(p), _s(r))
            w.finish()
        return {"out": out, "rows": len(c), "shards_merged": len(c.shards), "fingerprint": c.fingerprint}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)

