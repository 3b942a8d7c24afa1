"""Sweep, calibration and certification speed on large score arrays (CPU), one run.

* sweep over 10M scores vs one ``np.argsort`` of the same scores (target: within 3x);
* temperature, beta, Dirichlet (fixed and cross-validated ODIR) and isotonic fits on 1M rows;
* Learn-then-Test certification on 1M rows (grid from 1M val_select rows).

Usage: python benchmarks/calib_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import save_result  # noqa: E402
from headlab.calibrate import Beta, Dirichlet, Isotonic, Temperature  # noqa: E402
from headlab.certify import ltt_certify, ltt_grid  # noqa: E402
from headlab.sweep import exit_scores, pick_max_coverage, sweep  # noqa: E402


def best_of(fn, reps=3):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def data(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    s = rng.normal(0, 1, n) + 2.5 * (2 * y - 1)
    logits = np.stack([np.zeros(n), 1.8 * s], axis=1)  # over-confident
    return logits, y, 1.0 / (1.0 + np.exp(-1.8 * s))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_sweep, n_fit = (1_000_000, 100_000) if args.quick else (10_000_000, 1_000_000)
    out = {"sizes": {"sweep": n_sweep, "fit": n_fit}}

    _, y, p = data(n_sweep, 0)
    es = exit_scores(p, "max-softmax")
    t_sort = best_of(lambda: np.argsort(-es.score, kind="stable"))
    t_sort_default = best_of(lambda: np.argsort(es.score))
    t_sweep = best_of(lambda: pick_max_coverage(sweep(exit_scores(p, "max-softmax"), y), target=0.02))
    out["sweep"] = {"seconds": t_sweep, "argsort_stable_s": t_sort, "argsort_default_s": t_sort_default,
                    "ratio_vs_stable_argsort": t_sweep / t_sort, "ratio_vs_default_argsort": t_sweep / t_sort_default,
                    "target_ratio_max": 3.0}
    print(f"sweep of {n_sweep:,} scores: {t_sweep:.2f} s; one np.argsort: {t_sort_default:.2f} s (stable "
          f"{t_sort:.2f} s): ratio {t_sweep / t_sort_default:.2f} (target <= 3)")

    z, yf, _ = data(n_fit, 1)
    fits = {}
    for name, make in (("temperature", Temperature), ("beta", Beta),
                       ("dirichlet_fixed_reg", lambda: Dirichlet(lam=1e-3, mu=1e-3)),
                       ("dirichlet_cv", Dirichlet), ("isotonic", Isotonic)):
        fits[name] = best_of(lambda make=make: make().fit(z, yf), reps=1)
        print(f"fit {name} on {n_fit:,} rows: {fits[name]:.2f} s")
    out["fit_seconds"] = fits

    zs, ys, ps = data(n_fit, 2)
    zc, yc, pc = data(n_fit, 3)

    def certify():
        g = ltt_grid(exit_scores(ps, "max-softmax"), ys, n_calib=len(yc), definition="conditional",
                     alpha=0.02, delta=0.1)
        return ltt_certify(exit_scores(pc, "max-softmax"), yc, g, alpha=0.02, delta=0.1)

    t_cert = best_of(certify)
    rec = certify()
    out["certify"] = {"seconds": t_cert, "certified": rec["certified"], "coverage": rec.get("coverage")}
    print(f"certify on {n_fit:,} + {n_fit:,} rows: {t_cert:.2f} s (coverage {rec.get('coverage')})")
    if not args.quick:
        print("results:", save_result("calib_bench", out))


if __name__ == "__main__":
    main()
