"""Sweep, calibrate and certify on a run directory or on plain arrays.

Sources
-------
* a run directory (``stage1 train --out``): ``logits.npz`` holds the chosen head's
  logits for ``val_select`` and ``val_calib``; artifacts are written into the run dir.
* ``--logits FILE.npz`` with ``labels`` (N,) and ``logits`` (N, K) or ``probs``
  (N,) / (N, K): any model's outputs. Rows are split into val_select / val_calib by
  hashing the row index with the seed (or taken from ``val_select_*``/``val_calib_*``
  arrays when present); artifacts go to ``--out``.

Order of use: ``calibrate`` (fits on val_select) -> ``sweep`` (val_select) ->
``certify`` (grid from val_select, tested once on val_calib). Later steps use the
calibration found in the output directory.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

import schemas
from cache.errors import Stage1Error
from headlab import __version__
from headlab.calibrate import Calibrator, Identity, from_dict, make_calibrator
from headlab.certify import crc_certify, ltt_certify, ltt_grid
from headlab.metrics import classification_metrics, selective_metrics
from headlab.splits import split_select_calib
from headlab.sweep import (
    choose_t_pos,
    decision_sweep,
    exit_scores,
    pick_max_coverage,
    sweep,
    table_rows,
)

CALIBRATION = "calibration.json"
SWEEP_JSON, SWEEP_CSV = "sweep.json", "sweep.csv"
CERTIFICATE = "certificate.json"


@dataclass
class Outputs:
    """Model outputs split for selection and certification."""

    select_logits: np.ndarray  # (n_sel, K)
    select_labels: np.ndarray
    calib_logits: np.ndarray  # (n_cal, K)
    calib_labels: np.ndarray
    out_dir: str  # where artifacts go
    source: dict[str, Any]  # what the outputs came from (for provenance)

    @property
    def num_classes(self) -> int:
        return int(self.select_logits.shape[1])


def _as_logits(a: np.ndarray, what: str, path: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if what == "logits":
        if a.ndim != 2 or a.shape[1] < 2:
            raise Stage1Error(f"{path}: 'logits' must have shape (N, K>=2), got {a.shape}")
        return a
    if a.ndim == 1:
        a = np.stack([1.0 - a, a], axis=1)
    if a.ndim != 2 or ((a < 0) | (a > 1)).any() or not np.allclose(a.sum(1), 1.0, atol=1e-4):
        raise Stage1Error(f"{path}: 'probs' must be (N,) probabilities of class 1 or (N, K) rows summing to 1")
    return np.log(np.clip(a, 1e-12, 1.0))


def load_outputs(run_dir: str | None = None, *, logits_file: str | None = None, out: str | None = None,
                 ratio: float = 0.5, seed: int = 0) -> Outputs:
    """Read val_select / val_calib outputs from a run dir or a plain ``.npz`` file."""
    if (run_dir is None) == (logits_file is None):
        raise Stage1Error("give either a RUN_DIR or --logits FILE.npz (not both)")
    if run_dir is not None:
        from headlab.rundir import load_run

        run = load_run(run_dir)
        lg = run.logits()
        return Outputs(lg["val_select_logits"].astype(np.float64), lg["val_select_labels"],
                       lg["val_calib_logits"].astype(np.float64), lg["val_calib_labels"], out or run_dir,
                       {"run": os.path.abspath(run_dir), "cache_fingerprint": run.fingerprint,
                        "head": run.results["chosen_name"]})
    if out is None:
        raise Stage1Error("--logits needs --out DIR for the artifacts")
    if not os.path.isfile(logits_file):
        raise Stage1Error(f"{logits_file}: file not found; give an .npz with 'labels' and 'logits' or 'probs'")
    try:
        z = np.load(logits_file, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise Stage1Error(f"{logits_file}: cannot be read as .npz ({e}); save with numpy.savez") from None
    src = {"logits_file": os.path.abspath(logits_file)}
    if "val_select_logits" in arrays and "val_calib_logits" in arrays:
        return Outputs(arrays["val_select_logits"].astype(np.float64), arrays["val_select_labels"],
                       arrays["val_calib_logits"].astype(np.float64), arrays["val_calib_labels"], out, src)
    if "labels" not in arrays:
        raise Stage1Error(f"{logits_file}: no 'labels' array (found {sorted(arrays)}); "
                          "save labels (N,) with logits (N, K) or probs (N,)")
    key = "logits" if "logits" in arrays else "probs" if "probs" in arrays else None
    if key is None:
        raise Stage1Error(f"{logits_file}: needs a 'logits' (N, K) or 'probs' (N,) array beside 'labels'")
    z = _as_logits(arrays[key], key, logits_file)
    y = np.asarray(arrays["labels"]).astype(np.int64)
    if len(y) != len(z):
        raise Stage1Error(f"{logits_file}: {len(y)} labels but {len(z)} rows of {key}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise Stage1Error(f"{logits_file}: labels must lie in 0..{z.shape[1] - 1}; found {y.min()}..{y.max()}")
    groups = arrays["groups"].astype(str).tolist() if "groups" in arrays else [str(i) for i in range(len(y))]
    sel, cal = split_select_calib(groups, ratio=ratio, seed=seed)
    src.update(split={"ratio": ratio, "seed": seed, "key": "groups" if "groups" in arrays else "row index"})
    return Outputs(z[sel], y[sel], z[cal], y[cal], out, src)


def load_calibrator(out_dir: str, num_classes: int) -> tuple[Calibrator, dict[str, Any] | None]:
    path = os.path.join(out_dir, CALIBRATION)
    if not os.path.exists(path):
        return Identity(num_classes), None
    rec = schemas.read_json(path, "calibration")
    return from_dict(rec["calibrator"]), rec


def _metrics(labels, probs) -> dict[str, float]:
    m = {**classification_metrics(labels, probs), **selective_metrics(labels, probs)}
    return {k: (float(v) if v is not None and np.isfinite(v) else None) for k, v in m.items()}


def run_calibrate(o: Outputs, *, method: str = "temperature", variant: str = "full", seed: int = 0) -> dict[str, Any]:
    """Fit on val_select; metrics before/after on val_select and val_calib; write calibration.json."""
    cal = make_calibrator(method, variant=variant, seed=seed).fit(o.select_logits, o.select_labels)
    ident = Identity(o.num_classes)
    rec = {"stage1_version": __version__, "source": o.source, "method": method,
           "fitted_on": {"split": "val_select", "n": int(len(o.select_labels))},
           "calibrator": cal.to_dict(),
           "metrics": {split: {"before": _metrics(y, ident.predict_proba(z)), "after": _metrics(y, cal.predict_proba(z))}
                       for split, z, y in (("val_select", o.select_logits, o.select_labels),
                                           ("val_calib", o.calib_logits, o.calib_labels))}}
    os.makedirs(o.out_dir, exist_ok=True)
    schemas.write_json(rec, os.path.join(o.out_dir, CALIBRATION), "calibration")
    return rec


def _binary(o: Outputs, what: str) -> None:
    if o.num_classes != 2:
        raise Stage1Error(f"{what} works on binary outputs (exit rules on the positive-class probability); "
                          f"these have {o.num_classes} classes")


def run_sweep(o: Outputs, *, target: float = 0.02, definition: str = "conditional", rule: str = "max-softmax",
              max_fdr: float = 0.05) -> dict[str, Any]:
    """Every achievable exit threshold on val_select; writes sweep.csv and sweep.json."""
    _binary(o, "sweep")
    cal, cal_rec = load_calibrator(o.out_dir, o.num_classes)
    p = cal.predict_proba(o.select_logits)[:, 1]
    y = o.select_labels
    t_pos = choose_t_pos(p, y, max_fdr=max_fdr) if rule == "two-sided" else None
    es = exit_scores(p, rule, t_pos=t_pos)
    table = sweep(es, y)
    rows = table_rows(table, es)
    i = pick_max_coverage(table, target=target, definition=definition)
    dec = decision_sweep(p, y)
    rec = {"stage1_version": __version__, "source": o.source, "split": "val_select", "n": int(len(y)),
           "calibration": cal.method, "rule": rule, "t_pos": t_pos, "max_fdr": max_fdr if rule == "two-sided" else None,
           "target_fnr": target, "fnr_definition": definition, "thresholds": len(rows),
           "chosen": rows[i] if i is not None else None,
           "mcc_optimal": {"tau": dec["tau"], "mcc": dec["mcc"], "accuracy": dec["accuracy"]}}
    os.makedirs(o.out_dir, exist_ok=True)
    with open(os.path.join(o.out_dir, SWEEP_CSV), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[-1]))  # row 0 (nothing exits) has no threshold
        w.writeheader()
        w.writerows(rows)
    schemas.write_json(_clean(rec), os.path.join(o.out_dir, SWEEP_JSON), "sweep")
    rec["table"] = table
    return rec


def run_certify(o: Outputs, *, alpha: float = 0.02, delta: float = 0.1, definition: str = "conditional",
                rule: str = "max-softmax", max_fdr: float = 0.05, grid_size: int = 200,
                calibrator: Calibrator | None = None, write: bool = True) -> dict[str, Any]:
    """Grid from val_select, tested once on val_calib; writes certificate.json.

    ``calibrator`` defaults to the one saved in the output directory (identity if none)."""
    _binary(o, "certify")
    cal = calibrator if calibrator is not None else load_calibrator(o.out_dir, o.num_classes)[0]
    p_sel = cal.predict_proba(o.select_logits)[:, 1]
    p_cal = cal.predict_proba(o.calib_logits)[:, 1]
    t_pos = choose_t_pos(p_sel, o.select_labels, max_fdr=max_fdr) if rule == "two-sided" else None
    es_sel = exit_scores(p_sel, rule, t_pos=t_pos)
    grid = ltt_grid(es_sel, o.select_labels, n_calib=len(o.calib_labels), definition=definition, alpha=alpha,
                    delta=delta, size=grid_size)
    es_cal = exit_scores(p_cal, rule, t_pos=t_pos)
    ltt = ltt_certify(es_cal, o.calib_labels, grid, alpha=alpha, delta=delta, definition=definition)
    crc = crc_certify(es_cal, o.calib_labels, grid, alpha=alpha) if definition == "system" else None
    policy: dict[str, Any] = {"rule": rule, "certified": ltt["certified"], "calibration": cal.method,
                              "fnr_definition": definition, "alpha": alpha, "delta": delta}
    if rule == "two-sided":
        policy["t_pos"] = t_pos
        policy["t_pos_chosen_on"] = f"val_select, false-discovery rate <= {max_fdr} (not certified)"
    if ltt["certified"]:
        policy.update(es_cal.threshold_of(ltt["lam"]))
    rec = {"stage1_version": __version__, "source": o.source, "policy": policy, "ltt": ltt, "crc": crc,
           "n_select": int(len(o.select_labels)), "n_calib": int(len(o.calib_labels))}
    rec = _clean(rec)
    if write:
        os.makedirs(o.out_dir, exist_ok=True)
        schemas.write_json(rec, os.path.join(o.out_dir, CERTIFICATE), "certificate")
    else:
        schemas.validate(rec, "certificate", where="certificate")
    return rec


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
