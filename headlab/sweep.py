"""Exit-threshold sweeps: every achievable threshold in one sort.

An *exit rule* answers some rows itself and defers the rest. Rules (binary case,
``p`` = probability of the positive class):

``max-softmax``
    exit when ``max(p, 1 - p) >= t``; the decision is ``p >= 0.5``.
``two-sided``
    exit positive when ``p >= t_pos`` (``t_pos`` fixed beforehand, chosen for false
    positives), exit negative when ``p <= t_neg``; ``t_neg`` is swept.

A false negative (FN) is a positive that exits with decision 0. FNR definitions:
``conditional`` FN / positives among exits; ``exits`` FN / exits; ``system``
FN / all positives (the only one monotone in the threshold).

Everything works on a generic *score* (exit iff ``score >= lam``) and a per-row
decision, so one sort gives the whole table: O(N log N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cache.errors import Stage1Error

FNR_DEFINITIONS = ("conditional", "exits", "system")
RULES = ("max-softmax", "two-sided")


@dataclass(frozen=True)
class ExitScores:
    score: np.ndarray  # (N,) exit iff score >= lam (the swept rows)
    decision: np.ndarray  # (N,) 0/1 decision when a swept row exits
    fixed: np.ndarray  # (N,) bool: rows that exit whatever lam is (two-sided positive side)
    fixed_decision: int  # decision of the fixed exits
    rule: str

    def threshold_of(self, lam: float) -> dict[str, float]:
        """The rule's thresholds in probability units for score threshold ``lam``."""
        if self.rule == "max-softmax":
            return {"t_conf": float(lam)}
        return {"t_neg": float(1.0 - lam)}


def exit_scores(p: np.ndarray, rule: str = "max-softmax", *, t_pos: float | None = None) -> ExitScores:
    """Scores and decisions of ``rule`` for positive-class probabilities ``p``."""
    p = np.asarray(p, dtype=np.float64)
    if rule == "max-softmax":
        return ExitScores(np.maximum(p, 1.0 - p), (p >= 0.5).astype(np.int8), np.zeros(len(p), bool), 1, rule)
    if rule == "two-sided":
        if t_pos is None:
            raise ValueError("two-sided exits need t_pos")
        fixed = p >= t_pos
        # Rows exiting positive are fixed; the rest can only exit negative (score = 1 - p).
        score = np.where(fixed, -np.inf, 1.0 - p)
        return ExitScores(score, np.zeros(len(p), np.int8), fixed, 1, rule)
    raise Stage1Error(f"--rule {rule!r}: choose one of {list(RULES)}")


def _mcc(tp, fp, tn, fn):
    den = (tp + fp).astype(np.float64)
    den *= tp + fn
    den *= tn + fp
    den *= tn + fn
    np.sqrt(den, out=den)
    num = (tp * tn).astype(np.float64)
    num -= fp * fn
    return np.divide(num, den, out=np.zeros(len(den)), where=den > 0)


def _ratio(a, b):
    """a / b as float64, 0 where b == 0 (no float copies of the integer inputs)."""
    b = np.broadcast_to(b, np.shape(a))
    return np.divide(a, b, out=np.zeros(np.shape(a)), where=b > 0)


class SweepTable(dict):
    """Counts per achievable exit set; rates are derived on first access and cached, so
    picking a threshold touches only the columns it needs."""

    COLUMNS = ("exits", "coverage", "tp", "fp", "tn", "fn", "fnr_conditional", "fnr_exits", "fnr_system",
               "accuracy", "mcc")

    def __init__(self, counts: dict[str, np.ndarray], *, n: int, positives: int) -> None:
        super().__init__(counts)
        self.n, self.positives = n, positives

    def __missing__(self, key: str) -> np.ndarray:
        tp, fp, tn, fn, ex = (dict.__getitem__(self, k) for k in ("tp", "fp", "tn", "fn", "exits"))
        derive = {
            "coverage": lambda: ex / self.n,
            "fnr_conditional": lambda: _ratio(fn, fn + tp),
            "fnr_exits": lambda: _ratio(fn, ex),
            "fnr_system": lambda: _ratio(fn, self.positives),
            "accuracy": lambda: _ratio(tp + tn, ex),
            "mcc": lambda: _mcc(tp, fp, tn, fn),
        }
        if key not in derive:
            raise KeyError(key)
        self[key] = value = derive[key]()
        return value

    def full(self) -> SweepTable:
        for k in self.COLUMNS:
            self[k]
        return self


def _cumsum_at(mask: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Number of True among the first ``ends[j]`` entries of ``mask``, for every j."""
    c = np.empty(len(mask) + 1, dtype=np.int64)
    c[0] = 0
    np.cumsum(mask, out=c[1:])
    return c[ends]


def sweep(es: ExitScores, labels: np.ndarray) -> SweepTable:
    """One row per achievable exit set, strictest first (row 0 = no swept row exits).

    Columns: ``lam`` (exit iff score >= lam), ``exits``, ``coverage``, ``tp fp tn fn``
    among exits, ``fnr_conditional``, ``fnr_exits``, ``fnr_system``, ``accuracy`` and
    ``mcc`` among exits. Tied scores always exit together (only achievable sets).
    """
    y = np.asarray(labels)
    n = len(y)
    if n == 0:
        raise Stage1Error("cannot sweep thresholds on an empty set of rows")
    fx = es.fixed
    # Descending score order; order within ties is irrelevant (tie blocks are taken whole).
    # Memory traffic, not arithmetic, bounds this at scale: few temporaries, in place.
    if fx.any() or not np.isfinite(es.score).all():
        idx = np.flatnonzero(~fx & np.isfinite(es.score))
        order = idx[np.argsort(es.score[idx])[::-1]]
    else:
        order = np.argsort(es.score)[::-1]
    s = es.score[order]
    d = es.decision[order] != 0
    t = y[order] == 1
    # ends[j]: rows exiting at the j-th achievable set (0 = none), strictly increasing
    ends = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1, len(s)] if len(s) else np.array([0])
    pp = _cumsum_at(d, ends)  # predicted positive among exits
    fn = _cumsum_at(t, ends)  # positives among exits ...
    d &= t
    tp = _cumsum_at(d, ends)
    fn -= tp  # ... minus true positives
    pp -= tp
    fp = pp
    tn = ends - tp
    tn -= fp
    tn -= fn
    f_pos = int(np.count_nonzero(fx & (y == 1)))
    f_neg = int(np.count_nonzero(fx & (y == 0)))
    if f_pos or f_neg:  # rows exiting whatever the threshold (two-sided: the positive side)
        if es.fixed_decision == 1:
            tp += f_pos
            fp += f_neg
        else:
            tn += f_neg
            fn += f_pos
    exits = ends + (f_pos + f_neg) if (f_pos or f_neg) else ends
    lam = np.empty(len(ends))
    lam[0] = np.inf
    lam[1:] = s[ends[1:] - 1]
    return SweepTable({"lam": lam, "exits": exits, "tp": tp, "fp": fp, "tn": tn, "fn": fn}, n=n,
                      positives=int(np.count_nonzero(y == 1)))


def pick_max_coverage(table: dict[str, np.ndarray], *, target: float, definition: str = "conditional") -> int | None:
    """Row index with the most exits whose FNR (``definition``) is <= ``target``; None if none exits."""
    if definition not in FNR_DEFINITIONS:
        raise Stage1Error(f"--fnr-definition {definition!r}: choose one of {list(FNR_DEFINITIONS)}")
    ok = (table[f"fnr_{definition}"] <= target) & (table["exits"] > 0)
    if not ok.any():
        return None
    cand = np.flatnonzero(ok)
    return int(cand[np.argmax(table["exits"][cand])])


def _blocks_by_probability(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct probabilities, highest first: (threshold, rows with p >= it, positives and
    negatives among those rows) -- every achievable 'positive iff p >= t' decision."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(labels)
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    ends = np.r_[np.flatnonzero(ps[1:] != ps[:-1]) + 1, len(ps)]
    return ps[ends - 1], ends, np.cumsum(ys == 1)[ends - 1], np.cumsum(ys != 1)[ends - 1]


def decision_sweep(p: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The decision threshold (predict positive iff ``p >= tau``) that maximises MCC over all rows."""
    taus, _, tp, fp = _blocks_by_probability(p, labels)
    y = np.asarray(labels)
    P, N = int(np.sum(y == 1)), int(np.sum(y != 1))
    mcc = _mcc(tp, fp, N - fp, P - tp)
    acc = (tp + (N - fp)) / len(y)
    i = int(np.argmax(mcc))
    return {"tau": float(taus[i]), "mcc": float(mcc[i]), "accuracy": float(acc[i]),
            "taus": taus, "mccs": mcc, "accuracies": acc}


def choose_t_pos(p: np.ndarray, labels: np.ndarray, *, max_fdr: float) -> float:
    """Smallest ``t_pos`` whose positive exits have a false-discovery rate <= ``max_fdr``
    (most positive exits); just above 1 (no positive exits) when none qualifies."""
    taus, rows, _, fp = _blocks_by_probability(p, labels)
    ok = np.flatnonzero(fp / rows <= max_fdr)
    return float(taus[ok[-1]]) if len(ok) else float(np.nextafter(1.0, 2.0))


def table_rows(table: SweepTable, es: ExitScores) -> list[dict[str, Any]]:
    """The table as JSON-ready rows, thresholds in probability units."""
    table.full()
    rows = []
    for i in range(len(table["lam"])):
        r = {k: (float(v[i]) if v.dtype.kind == "f" else int(v[i])) for k, v in table.items() if k != "lam"}
        lam = float(table["lam"][i])
        rows.append({**(es.threshold_of(lam) if np.isfinite(lam) else {}), **r})
    return rows
