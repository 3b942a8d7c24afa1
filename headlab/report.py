"""`stage1 report`: PNG plots and one self-contained HTML page for a run or output dir.

Plots: reliability diagrams before/after calibration, risk-coverage curve, FNR vs
coverage with the certified upper bound and the alpha line, score histograms per class,
and the sweep curves (FNR, accuracy, MCC vs threshold).
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

import numpy as np

from headlab.calibrate import Identity
from headlab.certify import counts_at, effective, grid_from_select, upper_bound
from headlab.lab import CERTIFICATE, SWEEP_JSON, Outputs, load_calibrator
from headlab.metrics import as_prob_matrix
from headlab.sweep import exit_scores, sweep


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability(ax, labels, probs, title, n_bins=15):
    p = as_prob_matrix(probs)
    conf, correct = p.max(1), (p.argmax(1) == labels)
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(n_bins)])
    cnt = np.bincount(idx, minlength=n_bins)
    mids = (edges[:-1] + edges[1:]) / 2
    ax.bar(mids, np.nan_to_num(acc), width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect")
    ax2 = ax.twinx()
    ax2.plot(mids, cnt, "g.-", alpha=0.5)
    ax2.set_ylabel("rows", color="g")
    ax.set(xlabel="confidence", ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")


def make_report(o: Outputs, *, out_dir: str | None = None) -> dict[str, Any]:
    """Write PNGs and report.html into ``out_dir`` (default ``<outputs dir>/report``)."""
    plt = _plt()
    out_dir = out_dir or os.path.join(o.out_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    cal, cal_rec = load_calibrator(o.out_dir, o.num_classes)
    ident = Identity(o.num_classes)
    cert = _read(os.path.join(o.out_dir, CERTIFICATE))
    sw = _read(os.path.join(o.out_dir, SWEEP_JSON))
    figs: list[tuple[str, str]] = []

    def save(fig, name, caption):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figs.append((name, caption))

    # reliability before / after, on val_calib (held out from the calibrator's fit)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    reliability(axes[0], o.calib_labels, ident.predict_proba(o.calib_logits), "val_calib, uncalibrated")
    reliability(axes[1], o.calib_labels, cal.predict_proba(o.calib_logits), f"val_calib, {cal.method}")
    save(fig, "reliability.png", "Reliability diagrams on val_calib before and after calibration.")

    if o.num_classes == 2:
        p_cal = cal.predict_proba(o.calib_logits)[:, 1]
        y = o.calib_labels
        rule = (cert or {}).get("policy", {}).get("rule", "max-softmax")
        t_pos = (cert or {}).get("policy", {}).get("t_pos")
        es = exit_scores(p_cal, rule, t_pos=t_pos)
        table = sweep(es, y)

        # score histograms per class
        fig, ax = plt.subplots(figsize=(6.5, 4))
        bins = np.linspace(0, 1, 41)
        for k, name in ((0, "negative"), (1, "positive")):
            ax.hist(p_cal[y == k], bins=bins, alpha=0.6, label=f"{name} (n={int(np.sum(y == k))})")
        ax.set(xlabel="calibrated P(positive)", ylabel="rows", title="Scores per class (val_calib)")
        ax.legend()
        save(fig, "scores.png", "Calibrated positive-class probability per true class on val_calib.")

        # risk-coverage (selective error of the argmax decision)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        err = (table["fp"] + table["fn"]) / np.maximum(table["exits"], 1)
        ax.plot(table["coverage"][1:], err[1:], label="selective error")
        ax.set(xlabel="coverage (share of rows exiting)", ylabel="error among exits", title="Risk-coverage (val_calib)")
        ax.grid(alpha=0.3)
        save(fig, "risk_coverage.png", "Error among exited rows against coverage.")

        # FNR vs coverage with the bound and alpha
        definition = (cert or {}).get("policy", {}).get("fnr_definition", "conditional")
        alpha = (cert or {}).get("policy", {}).get("alpha", 0.02)
        delta = (cert or {}).get("policy", {}).get("delta", 0.1)
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(table["coverage"][1:], table[f"fnr_{definition}"][1:], label=f"empirical FNR ({definition})")
        es_sel = exit_scores(cal.predict_proba(o.select_logits)[:, 1], rule, t_pos=t_pos)
        grid = grid_from_select(es_sel.score[~es_sel.fixed])
        c = counts_at(es, y, grid)
        k, n = effective(c, definition)
        ub = np.array([upper_bound(int(a), int(b), delta) for a, b in zip(k, n, strict=True)])
        ax.plot(c["exits"] / c["n"], ub, "--", label=f"upper bound (1-delta={1 - delta:g})")
        ax.axhline(alpha, color="r", lw=1, label=f"alpha = {alpha:g}")
        if cert and cert["ltt"].get("certified"):
            ax.axvline(cert["ltt"]["coverage"], color="g", lw=1, label=f"certified coverage {cert['ltt']['coverage']:.3f}")
        top = min(1.0, max(4 * alpha, 1.05 * float(np.max(table[f"fnr_{definition}"]))))
        ax.set(xlabel="coverage", ylabel="FNR", title="FNR vs coverage (val_calib)", ylim=(0, top))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "fnr_coverage.png", "FNR among exits against coverage, with the Clopper-Pearson upper bound "
             "used by certification and the target alpha.")

        # sweep curves vs threshold
        fig, ax = plt.subplots(figsize=(6.5, 4))
        lam = table["lam"][1:]
        thr = lam if rule == "max-softmax" else 1 - lam
        for col in ("fnr_conditional", "fnr_exits", "accuracy", "mcc", "coverage"):
            ax.plot(thr, table[col][1:], label=col)
        ax.set(xlabel="t_conf" if rule == "max-softmax" else "t_neg", title="Sweep (val_calib)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "sweep.png", "Per-threshold coverage, FNR, accuracy and MCC among exits.")

    page = _html(o, figs, out_dir, cal_rec, sw, cert)
    with open(os.path.join(out_dir, "report.html"), "w", encoding="utf-8") as fh:
        fh.write(page)
    return {"out": out_dir, "html": os.path.join(out_dir, "report.html"), "plots": [f for f, _ in figs]}


def _read(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)[:200]
    return str(v)


def _html(o, figs, out_dir, cal_rec, sw, cert) -> str:
    parts = [f"<h1>stage1 report</h1><p>source: {html.escape(json.dumps(o.source))}</p>",
             f"<p>val_select rows: {len(o.select_labels)}, val_calib rows: {len(o.calib_labels)}</p>"]
    if cert:
        pol, ltt = cert["policy"], cert["ltt"]
        verdict = (f"<b>certified</b>: FNR ({pol['fnr_definition']}) &le; {pol['alpha']} with probability "
                   f"&ge; {1 - pol['delta']:.3g}; upper bound {ltt['upper_bound']:.4f}, coverage {ltt['coverage']:.3f}"
                   if ltt["certified"] else f"<b>not certified</b>: {html.escape(ltt['reason'])}")
        parts.append(f"<h2>Exit policy</h2><p>{verdict}</p>{_table(pol)}")
    if cal_rec:
        m = cal_rec["metrics"]["val_calib"]
        keys = ("nll", "ece", "ace", "brier", "accuracy", "mcc", "auroc", "aurc")
        rows = "".join(f"<tr><td>{k}</td><td>{_fmt(m['before'].get(k))}</td><td>{_fmt(m['after'].get(k))}</td></tr>"
                       for k in keys)
        parts.append(f"<h2>Calibration: {cal_rec['method']}</h2><table><tr><th>val_calib</th><th>before</th>"
                     f"<th>after</th></tr>{rows}</table>")
    if sw:
        parts.append(f"<h2>Sweep (val_select)</h2>{_table({k: v for k, v in sw.items() if k != 'source'})}")
    for name, caption in figs:
        with open(os.path.join(out_dir, name), "rb") as fh:
            b64 = base64.b64encode(fh.read()).decode()
        parts.append(f"<figure><img src='data:image/png;base64,{b64}'><figcaption>{html.escape(caption)}"
                     "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>stage1 report</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"


def drift_report(out_dir: str, drift: dict[str, Any], ref_p: np.ndarray, ref_y: np.ndarray, new_p: np.ndarray,
                 new_y: np.ndarray) -> str:
    """drift.png + drift.html: reference vs new score distributions per class, and the drift table."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.linspace(0, 1, 31)
    for ax, k, name in ((axes[0], 0, "negatives"), (axes[1], 1, "positives")):
        ax.hist(ref_p[ref_y == k], bins=bins, alpha=0.55, density=True, label="reference (bundle)")
        ax.hist(new_p[new_y == k], bins=bins, alpha=0.55, density=True, label="new batch")
        d = drift["per_class"][str(k)]
        ax.set(title=f"{name}: KS {_fmt(d['ks'])}, PSI {_fmt(d['psi'])}", xlabel="P(positive), bundle's calibration")
        ax.legend()
    fig.tight_layout()
    png = os.path.join(out_dir, "drift.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    with open(png, "rb") as fh:
        b64 = base64.b64encode(fh.read()).decode()
    rows = []
    for section in ("label_prior", "ece_new_batch"):
        rows.append(f"<h2>{section.replace('_', ' ')}</h2>{_table(drift[section])}")
    for who in ("old", "new"):
        rows.append(f"<h2>{who} policy on the new val_calib</h2>{_table(drift['policy'][who])}")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>stage1 drift</title><style>body{font-family:"
            "sans-serif;max-width:1100px;margin:2em auto}td{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}"
            "</style></head><body><h1>Re-calibration drift report</h1>"
            f"<p>reference rows {drift['n_reference']}, new rows {drift['n_new']}</p>"
            f"<img src='data:image/png;base64,{b64}'>{''.join(rows)}</body></html>")
    path = os.path.join(out_dir, "drift.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
