"""Deployment bundles: a directory a deployment can trust.

Layout::

    manifest.json        schema-validated; lists every other file with its sha256
    head.safetensors     the chosen head's weights
    calibrator.json      the fitted calibration map
    policy.json          the exit policy with its certification record
    reference.npz        calibrated val scores and labels (for drift checks on re-calibration)

Loading verifies the schema and every hash and refuses a tampered or incomplete bundle.
No pickle is ever loaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import schemas
from cache.errors import Stage1Error
from headlab import __version__
from headlab.calibrate import Calibrator, Identity, from_dict
from headlab.heads import Head

BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def natix_remap(p: np.ndarray, tau: float) -> np.ndarray:
    """Monotone map sending ``tau`` to 0.5, so rounding at 0.5 reproduces ``p >= tau``."""
    p = np.asarray(p, dtype=np.float64)
    if tau <= 0.0 or tau >= 1.0:
        return p
    return np.where(p < tau, 0.5 * p / tau, 0.5 + 0.5 * (p - tau) / (1.0 - tau))


@dataclass
class Bundle:
    path: str
    manifest: dict[str, Any]
    head: Head
    calibrator: Calibrator
    policy: dict[str, Any]

    @property
    def decision_threshold(self) -> float:
        return float(self.manifest["decision_threshold"])

    @property
    def feature_sets(self) -> list[str]:
        return list(self.manifest["head"]["feature_sets"])

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Head logits for features ``(N, D)`` laid out as ``feature_sets`` side by side.

        Features are rounded to the cache's stored dtype first, so raw-image predictions
        see exactly what training saw."""
        dtype = np.dtype(self.manifest["cache"]["feature_dtype"])
        x = np.asarray(x).astype(dtype).astype(np.float32)
        return self.head(torch.from_numpy(x)).numpy()

    def decide(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Calibrated P(positive), the operating decision and the exit/defer action per row."""
        p = self.calibrator.predict_proba(logits)[:, 1]
        decision = (p >= self.decision_threshold).astype(np.int64)
        return {"prob": p, "decision": decision, "exit": apply_policy(self.policy, p)}


def apply_policy(policy: dict[str, Any], p: np.ndarray) -> np.ndarray:
    """Boolean exit mask of a certified policy; nothing exits when nothing was certified."""
    p = np.asarray(p, dtype=np.float64)
    pol = policy["policy"]
    if not pol["certified"]:
        return np.zeros(len(p), dtype=bool)
    if pol["rule"] == "max-softmax":
        return np.maximum(p, 1.0 - p) >= pol["t_conf"]
    return (p >= pol["t_pos"]) | (p <= pol["t_neg"])


def policy_outcome(policy: dict[str, Any], p: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Coverage and conditional FNR (FN / positives among exits) of ``policy`` on labelled rows."""
    ex = apply_policy(policy, p)
    pol = policy["policy"]
    pred = (p >= pol["t_pos"]) if pol.get("rule") == "two-sided" and pol.get("t_pos") is not None else (p >= 0.5)
    y = np.asarray(labels)
    fn = int(np.sum(ex & (y == 1) & ~pred))
    pos = int(np.sum(ex & (y == 1)))
    return {"coverage": float(ex.mean()) if len(ex) else 0.0, "fnr_conditional": fn / pos if pos else 0.0,
            "exits": int(ex.sum())}


def export_bundle(run_dir: str, out: str, *, decision_threshold: str = "0.5") -> dict[str, Any]:
    """Package a run's chosen head, calibration and certified policy into ``out``."""
    from headlab.lab import CALIBRATION, CERTIFICATE, SWEEP_JSON, load_outputs
    from headlab.rundir import load_run

    run = load_run(run_dir)
    cert_path = os.path.join(run_dir, CERTIFICATE)
    if not os.path.exists(cert_path):
        raise Stage1Error(f"{run_dir}: no {CERTIFICATE}; run `stage1 certify {run_dir}` (after `stage1 calibrate`) "
                          "before exporting")
    if run.num_classes != 2:
        raise Stage1Error(f"{run_dir}: bundles hold binary exit policies; this run has {run.num_classes} classes")
    cert = schemas.read_json(cert_path, "certificate")
    cal_path = os.path.join(run_dir, CALIBRATION)
    cal_dict = schemas.read_json(cal_path, "calibration")["calibrator"] if os.path.exists(cal_path) else \
        Identity(2).to_dict()
    if decision_threshold == "mcc":
        sw_path = os.path.join(run_dir, SWEEP_JSON)
        if not os.path.exists(sw_path):
            raise Stage1Error(f"{run_dir}: --decision-threshold mcc needs {SWEEP_JSON}; run `stage1 sweep {run_dir}`")
        tau = float(schemas.read_json(sw_path, "sweep")["mcc_optimal"]["tau"])
    else:
        try:
            tau = float(decision_threshold)
        except ValueError:
            raise Stage1Error(f"--decision-threshold {decision_threshold!r}: give a probability or 'mcc'") from None
        if not 0.0 < tau < 1.0:
            raise Stage1Error(f"--decision-threshold {tau} must lie strictly between 0 and 1")
    if os.path.exists(out) and os.listdir(out):
        raise Stage1Error(f"{out}: exists and is not empty; choose a new --out (bundles are never overwritten)")
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(run_dir, "head.safetensors"), os.path.join(out, "head.safetensors"))
    o = load_outputs(run_dir)
    cal = from_dict(cal_dict)
    _write_payload(out, cal, cert, o.select_logits, o.select_labels, o.calib_logits, o.calib_labels)
    prov = run.config["provenance"]
    spec = run.spec
    manifest = {
        "bundle_format_version": BUNDLE_FORMAT_VERSION, "stage1_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "parent": None,
        "backbone": {**prov["backbone"], **prov.get("backbone_source", {})},
        "preprocessing": prov["preprocessing"],
        "cache": {"fingerprint": run.fingerprint, "feature_dtype": prov["feature_dtype"]},
        "head": {"kind": spec.kind, "hidden": spec.hidden, "dropout": spec.dropout, "features": spec.features,
                 "feature_sets": run.feature_sets(), "in_dim": int(run.load_head().in_dim),
                 "num_classes": run.num_classes, "name": run.results["chosen_name"]},
        "calibrator": cal_dict["method"], "decision_threshold": tau, "policy": cert["policy"],
        "metrics": {"val_select": run.results["chosen_val_select"],
                    "certification": {k: cert["ltt"].get(k) for k in ("certified", "upper_bound", "coverage",
                                                                       "effective_n", "errors", "p_value")}},
        "source_run": os.path.abspath(run_dir),
    }
    return _finish(out, manifest)


def _write_payload(out, cal: Calibrator, cert: dict, zs, ys, zc, yc) -> None:
    with open(os.path.join(out, "calibrator.json"), "w") as fh:
        json.dump(cal.to_dict(), fh, indent=2)
    with open(os.path.join(out, "policy.json"), "w") as fh:
        json.dump(cert, fh, indent=2)
    z = np.concatenate([zs, zc])
    np.savez_compressed(os.path.join(out, "reference.npz"), prob=cal.predict_proba(z)[:, 1],
                        labels=np.concatenate([ys, yc]), logits=z.astype(np.float32))


def _finish(out: str, manifest: dict[str, Any]) -> dict[str, Any]:
    files = sorted(f for f in os.listdir(out) if f != MANIFEST)
    manifest["files"] = {f: sha256_file(os.path.join(out, f)) for f in files}
    schemas.write_json(manifest, os.path.join(out, MANIFEST), "bundle_manifest")
    return manifest


def load_bundle(path: str) -> Bundle:
    """Verify schema and hashes, then load head, calibrator and policy."""
    from safetensors.torch import load_file

    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise Stage1Error(f"{path}: not a bundle directory (made by `stage1 export`)")
    manifest = schemas.read_json(mpath, "bundle_manifest")
    for name, digest in manifest["files"].items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise Stage1Error(f"{fp}: missing from the bundle; the bundle is incomplete, re-export it")
        if sha256_file(fp) != digest:
            raise Stage1Error(f"{fp}: sha256 does not match the manifest (file changed after export); "
                              "re-export the bundle rather than editing it")
    for needed in ("head.safetensors", "calibrator.json", "policy.json"):
        if needed not in manifest["files"]:
            raise Stage1Error(f"{mpath}: lists no {needed}; the bundle is incomplete, re-export it")
    h = manifest["head"]
    head = Head(h["in_dim"], h["num_classes"], kind=h["kind"], hidden=h["hidden"], dropout=h["dropout"])
    head.load_state_dict(load_file(os.path.join(path, "head.safetensors")))
    with open(os.path.join(path, "calibrator.json")) as fh:
        cal = from_dict(json.load(fh))
    policy = schemas.read_json(os.path.join(path, "policy.json"), "certificate")
    return Bundle(path, manifest, head.eval(), cal, policy)
