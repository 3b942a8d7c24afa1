"""Certifying an exit threshold with a finite-sample guarantee.

Learn-then-Test (Angelopoulos et al. 2021): a grid of thresholds is fixed from
``val_select`` before ``val_calib`` is looked at. For each grid point, H0: risk > alpha
is tested on ``val_calib`` with the exact binomial test, p = P(Bin(n, alpha) <= k) (k
errors among n effective samples); fixed-sequence testing from the strictest point,
stopping at the first failure, controls the family-wise error, so the most permissive
rejected threshold satisfies P(risk <= alpha) >= 1 - delta.

For the monotone ``system`` FNR, conformal risk control (Angelopoulos et al. 2022,
Thm. 1) is also given: the most permissive grid point with
n/(n+1) * Rhat + 1/(n+1) <= alpha has E[risk] <= alpha.

With zero errors a grid point still needs n >= ln(delta)/ln(1 - alpha) effective
samples (114 at alpha 0.02, delta 0.1): below that nothing is certified, and the result
says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from cache.errors import Stage1Error
from headlab.sweep import FNR_DEFINITIONS, ExitScores

METHOD_LTT = "ltt-binomial-fixed-sequence"
# The sequence starts where val_select's own test (scaled to val_calib's size) passes with
# this margin: a first test that is likely to fail on val_calib would stop everything.
START_MARGIN = 0.2


def grid_from_select(score_select: np.ndarray, *, size: int = 200) -> np.ndarray:
    """Candidate score thresholds from val_select quantiles, strictest (largest) first."""
    s = np.asarray(score_select, dtype=np.float64)
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise Stage1Error("val_select has no rows that can exit; cannot build a threshold grid")
    q = np.quantile(s, np.linspace(1.0, 0.0, size + 1)[1:], method="higher")
    return np.unique(q)[::-1]


def ltt_grid(es_select: ExitScores, labels_select: np.ndarray, *, n_calib: int, definition: str,
             alpha: float, delta: float, size: int = 200) -> np.ndarray:
    """The fixed-sequence grid, decided on val_select alone (valid for LTT: the order of
    the hypotheses may depend on anything but val_calib's labels).

    Quantiles of the val_select scores, strictest first, starting at the first threshold
    where the effective sample count expected on val_calib (val_select's, scaled by
    n_calib / n_select) reaches the zero-error minimum: stricter points could never be
    certified, and a first test that cannot pass would stop the whole sequence.
    """
    grid = grid_from_select(es_select.score[~es_select.fixed], size=size)
    k, n_eff = effective(counts_at(es_select, labels_select, grid), definition)
    scale = n_calib / max(len(labels_select), 1)
    with np.errstate(invalid="ignore"):
        p_sel = np.where(n_eff > 0, binom.cdf(np.floor(k * scale), np.maximum(np.round(n_eff * scale), 1), alpha), 1.0)
    ok = np.flatnonzero(p_sel <= START_MARGIN * delta)
    start = int(ok[0]) if len(ok) else int(np.argmin(p_sel))
    return grid[start:]


def counts_at(es: ExitScores, labels: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
    """tp, fp, tn, fn, exits at every grid threshold (exit iff score >= lam), one sort."""
    y = np.asarray(labels).astype(np.int64)
    swept = ~es.fixed & np.isfinite(es.score)
    order = np.flatnonzero(swept)[np.argsort(-es.score[swept], kind="stable")]
    s, d, t = es.score[order], es.decision[order], y[order]
    cum = lambda m: np.r_[0, np.cumsum(m)]  # noqa: E731
    # number of swept rows with score >= lam: s is descending, so search on -s
    k = np.searchsorted(-s, -grid, side="right")
    fpos, fneg = int(np.sum(es.fixed & (y == 1))), int(np.sum(es.fixed & (y == 0)))
    tp = cum((d == 1) & (t == 1))[k] + (fpos if es.fixed_decision == 1 else 0)
    fp = cum((d == 1) & (t == 0))[k] + (fneg if es.fixed_decision == 1 else 0)
    tn = cum((d == 0) & (t == 0))[k] + (fneg if es.fixed_decision == 0 else 0)
    fn = cum((d == 0) & (t == 1))[k] + (fpos if es.fixed_decision == 0 else 0)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "exits": tp + fp + tn + fn, "positives": int(np.sum(y == 1)),
            "n": len(y)}


def effective(c: dict[str, np.ndarray], definition: str) -> tuple[np.ndarray, np.ndarray]:
    """(errors k, effective samples n) per grid point for an FNR definition."""
    if definition == "conditional":
        return c["fn"], c["fn"] + c["tp"]
    if definition == "exits":
        return c["fn"], c["exits"]
    if definition == "system":
        return c["fn"], np.full_like(c["fn"], c["positives"])
    raise Stage1Error(f"--fnr-definition {definition!r}: choose one of {list(FNR_DEFINITIONS)}")


def upper_bound(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound at level 1 - delta."""
    if n == 0:
        return 1.0
    return 1.0 if k >= n else float(beta_dist.ppf(1.0 - delta, k + 1, n - k))


def min_samples(alpha: float, delta: float) -> int:
    """Effective samples needed to certify with zero errors."""
    return int(math.ceil(math.log(delta) / math.log(1.0 - alpha)))


def ltt_certify(es_calib: ExitScores, labels_calib: np.ndarray, grid: np.ndarray, *, alpha: float = 0.02,
                delta: float = 0.1, definition: str = "conditional") -> dict[str, Any]:
    """Learn-then-Test with binomial p-values and fixed-sequence testing over ``grid``
    (strictest first). Returns the certificate record (``lam`` None when nothing passes)."""
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise Stage1Error(f"alpha {alpha} and delta {delta} must lie strictly between 0 and 1")
    c = counts_at(es_calib, labels_calib, grid)
    k, n = effective(c, definition)
    with np.errstate(invalid="ignore"):
        pvals = np.where(n > 0, binom.cdf(k, np.maximum(n, 1), alpha), 1.0)
    passed = pvals <= delta
    stop = int(np.argmin(passed)) if not passed.all() else len(grid)  # first failure
    rec: dict[str, Any] = {
        "method": METHOD_LTT, "definition": definition, "alpha": alpha, "delta": delta,
        "grid": {"size": int(len(grid)), "max": float(grid[0]), "min": float(grid[-1]), "source": "val_select"},
        "n_calib": int(c["n"]), "positives_calib": int(c["positives"]), "tests_passed": stop,
        "min_effective_n_zero_errors": min_samples(alpha, delta),
    }
    if stop == 0:
        rec.update(lam=None, certified=False, reason=_why_none(k[0], n[0], pvals[0], alpha, delta))
        rec["first_failure"] = {"lam": float(grid[0]), "errors": int(k[0]), "effective_n": int(n[0]),
                                "p_value": float(pvals[0])}
        return rec
    j = stop - 1
    rec.update(lam=float(grid[j]), certified=True, errors=int(k[j]), effective_n=int(n[j]), p_value=float(pvals[j]),
               upper_bound=upper_bound(int(k[j]), int(n[j]), delta), exits=int(c["exits"][j]),
               coverage=float(c["exits"][j] / c["n"]), empirical_risk=float(k[j] / n[j]) if n[j] else 0.0)
    if stop < len(grid):
        rec["first_failure"] = {"lam": float(grid[stop]), "errors": int(k[stop]), "effective_n": int(n[stop]),
                                "p_value": float(pvals[stop])}
    return rec


def _why_none(k: int, n: int, p: float, alpha: float, delta: float) -> str:
    need = min_samples(alpha, delta)
    if n < need:
        return (f"no certified exit: at the strictest grid threshold only {int(n)} effective samples exit "
                f"({int(k)} errors), and certifying FNR <= {alpha} at delta {delta} needs at least {need} even "
                "with zero errors; give val_calib more rows (or relax alpha/delta)")
    return (f"no certified exit: at the strictest grid threshold {int(k)} errors among {int(n)} effective samples "
            f"give p = {p:.3g} > delta {delta}; the head's most confident exits are not reliable enough for "
            f"FNR <= {alpha}")


def crc_certify(es_calib: ExitScores, labels_calib: np.ndarray, grid: np.ndarray, *, alpha: float = 0.02) -> dict[str, Any]:
    """Conformal risk control for the monotone system FNR (loss 1 per false-negative
    positive, bound B = 1, n = positives): E[FN / positives] <= alpha."""
    c = counts_at(es_calib, labels_calib, grid)
    n = c["positives"]
    rec: dict[str, Any] = {"method": "conformal-risk-control", "definition": "system", "alpha": alpha,
                           "n": int(n), "guarantee": "expected system FNR <= alpha (marginal over calibration sets)"}
    if n == 0:
        rec.update(lam=None, certified=False, reason="no positives in val_calib")
        return rec
    adj = n / (n + 1.0) * (c["fn"] / n) + 1.0 / (n + 1.0)
    ok = adj <= alpha
    if not ok[0]:
        rec.update(lam=None, certified=False,
                   reason=f"no certified exit: even the strictest grid threshold gives {adj[0]:.4f} > alpha "
                          f"({n} positives; 1/(n+1) alone is {1 / (n + 1):.4f})")
        return rec
    # the loss is monotone in lam, so the admissible set is a prefix of the strict-first grid
    j = int(np.argmin(ok)) - 1 if not ok.all() else len(grid) - 1
    rec.update(lam=float(grid[j]), certified=True, adjusted_risk=float(adj[j]), errors=int(c["fn"][j]),
               exits=int(c["exits"][j]), coverage=float(c["exits"][j] / c["n"]))
    return rec
