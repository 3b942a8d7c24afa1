"""`stage1 recalibrate`: refit calibration and re-certify a bundle on a new labelled batch.

No retraining: the bundle's head scores the new cache (whose fingerprint must match the
bundle's backbone and preprocessing); the rows are split into val_select/val_calib by
group hash as in training; the calibrator (same method) is refitted on val_select and
the exit policy (same rule, FNR definition, alpha, delta) re-certified on val_calib.
The new bundle names its parent. Drift against the bundle's reference scores is
reported: per-class KS and PSI of the calibrated score, label-prior shift, ECE of the
old and new calibration on the new batch, and old vs new thresholds and coverage.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from cache.errors import Stage1Error
from cache.format import short
from headlab.bundle import (
    MANIFEST,
    _finish,
    _write_payload,
    load_bundle,
    policy_outcome,
    sha256_file,
)
from headlab.calibrate import make_calibrator
from headlab.data import load_matrix, open_labelled
from headlab.lab import Outputs, run_certify
from headlab.metrics import ece
from headlab.splits import split_select_calib


def psi(ref: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """Population stability index over ``bins`` quantile bins of ``ref``."""
    if len(ref) == 0 or len(new) == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    a = np.histogram(ref, edges)[0] / len(ref)
    b = np.histogram(new, edges)[0] / len(new)
    a, b = np.clip(a, 1e-6, None), np.clip(b, 1e-6, None)
    return float(np.sum((b - a) * np.log(b / a)))


def recalibrate(bundle_dir: str, cache_paths: list[str], out: str, *, ratio: float = 0.5, seed: int = 0,
                method: str | None = None) -> dict[str, Any]:
    b = load_bundle(bundle_dir)
    m = b.manifest
    if os.path.exists(out) and os.listdir(out):
        raise Stage1Error(f"{out}: exists and is not empty; choose a new --out")
    with open_labelled(cache_paths, "re-calibration") as c:
        if c.fingerprint != m["cache"]["fingerprint"]:
            raise Stage1Error(
                f"{c.describe_source()}: cache fingerprint {short(c.fingerprint)} does not match the bundle's "
                f"{short(m['cache']['fingerprint'])} ({bundle_dir}); extract the new batch with the bundle's backbone "
                f"({m['backbone'].get('spec', '?')}) and '{m['preprocessing']['preset']}' preprocessing")
        logits = b.logits(load_matrix(c, b.feature_sets)).astype(np.float64)
        y = np.asarray(c.labels, dtype=np.int64)
        sel, cal = split_select_calib(c.group.tolist(), ratio=ratio, seed=seed)
        source = {"bundle": os.path.abspath(bundle_dir), "cache": [os.path.abspath(p) for p in cache_paths],
                  "cache_fingerprint": c.fingerprint}
    if y.max() > 1:
        raise Stage1Error(f"{cache_paths[0]}: labels must be 0/1 for a binary bundle; found {int(y.max())}")
    os.makedirs(out, exist_ok=True)
    method = method or b.calibrator.method
    o = Outputs(logits[sel], y[sel], logits[cal], y[cal], out, source)
    new_cal = make_calibrator(method, seed=seed).fit(o.select_logits, o.select_labels)
    pol = b.policy["policy"]
    cert = run_certify(o, alpha=pol["alpha"], delta=pol["delta"], definition=pol["fnr_definition"], rule=pol["rule"],
                       calibrator=new_cal, write=False)

    # drift: reference (bundle's validation scores) vs the new batch, both under the old calibration
    with np.load(os.path.join(bundle_dir, "reference.npz"), allow_pickle=False) as z:
        ref_p, ref_y = z["prob"], z["labels"]
    old_p = b.calibrator.predict_proba(logits)[:, 1]
    new_p = new_cal.predict_proba(logits)[:, 1]
    drift: dict[str, Any] = {"n_new": int(len(y)), "n_reference": int(len(ref_y)), "per_class": {}}
    for k in (0, 1):
        r, n = ref_p[ref_y == k], old_p[y == k]
        ks = ks_2samp(r, n) if len(r) and len(n) else None
        drift["per_class"][str(k)] = {"ks": float(ks.statistic) if ks else None,
                                      "ks_p_value": float(ks.pvalue) if ks else None, "psi": psi(r, n),
                                      "mean_score_reference": float(r.mean()) if len(r) else None,
                                      "mean_score_new": float(n.mean()) if len(n) else None}
    drift["label_prior"] = {"reference": float(ref_y.mean()), "new": float(y.mean())}
    drift["ece_new_batch"] = {"old_calibration": ece(y[cal], old_p[cal]), "new_calibration": ece(y[cal], new_p[cal])}
    keys = ("t_conf", "t_neg", "t_pos", "certified")
    drift["policy"] = {"old": {**{k: pol.get(k) for k in keys}, **policy_outcome(b.policy, old_p[cal], y[cal])},
                       "new": {**{k: cert["policy"].get(k) for k in keys}, **policy_outcome(cert, new_p[cal], y[cal])}}

    import shutil

    shutil.copyfile(os.path.join(bundle_dir, "head.safetensors"), os.path.join(out, "head.safetensors"))
    _write_payload(out, new_cal, cert, o.select_logits, o.select_labels, o.calib_logits, o.calib_labels)
    manifest = {k: v for k, v in m.items() if k not in ("files", "drift")}
    manifest.update(parent={"path": os.path.abspath(bundle_dir),
                            "manifest_sha256": sha256_file(os.path.join(bundle_dir, MANIFEST))},
                    calibrator=method, policy=cert["policy"], drift=drift,
                    metrics={**m["metrics"], "certification": {k: cert["ltt"].get(k) for k in (
                        "certified", "upper_bound", "coverage", "effective_n", "errors", "p_value")}})
    import datetime as dt

    manifest["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with open(os.path.join(out, "drift.json"), "w") as fh:
        json.dump(drift, fh, indent=2)
    from headlab.report import drift_report

    drift_report(out, drift, ref_p, ref_y, old_p, y)
    _finish(out, manifest)
    return {"out": out, "drift": drift, "certificate": cert["ltt"], "policy": cert["policy"]}
