"""Sweeps equal brute force; certification holds its guarantee over many random splits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from cache import Stage1Error
from headlab.certify import (
    counts_at,
    crc_certify,
    grid_from_select,
    ltt_certify,
    ltt_grid,
    min_samples,
    upper_bound,
)
from headlab.sweep import choose_t_pos, decision_sweep, exit_scores, pick_max_coverage, sweep


def _brute(p, y, rule, t_pos=None):
    """Every distinct exit set by direct evaluation."""
    es = exit_scores(p, rule, t_pos=t_pos)
    out = []
    for lam in [np.inf, *sorted(set(es.score[np.isfinite(es.score)].tolist()), reverse=True)]:
        ex = (es.score >= lam) | es.fixed
        dec = np.where(es.fixed, es.fixed_decision, es.decision)
        tp = int(np.sum(ex & (dec == 1) & (y == 1)))
        fp = int(np.sum(ex & (dec == 1) & (y == 0)))
        tn = int(np.sum(ex & (dec == 0) & (y == 0)))
        fn = int(np.sum(ex & (dec == 0) & (y == 1)))
        ex_pred = dec[ex]
        mcc = matthews_corrcoef(y[ex], ex_pred) if ex.sum() and len(set(y[ex])) > 1 and len(set(ex_pred)) > 1 else 0.0
        out.append((tp, fp, tn, fn, mcc))
    return out


@pytest.mark.parametrize("rule", ["max-softmax", "two-sided"])
def test_sweep_equals_brute_force_with_heavy_ties(rule):
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        p = np.round(np.clip(rng.beta(2, 2, n) + 0.2 * (y - 0.5), 0, 1) * 20) / 20  # only 21 distinct values
        t_pos = 0.8 if rule == "two-sided" else None
        table = sweep(exit_scores(p, rule, t_pos=t_pos), y)
        brute = _brute(p, y, rule, t_pos)
        assert len(table["lam"]) == len(brute), trial
        for i, (tp, fp, tn, fn, mcc) in enumerate(brute):
            assert (table["tp"][i], table["fp"][i], table["tn"][i], table["fn"][i]) == (tp, fp, tn, fn)
            assert table["mcc"][i] == pytest.approx(mcc, abs=1e-9)
            ex = tp + fp + tn + fn
            assert table["fnr_conditional"][i] == pytest.approx(fn / (fn + tp) if fn + tp else 0.0)
            assert table["fnr_exits"][i] == pytest.approx(fn / ex if ex else 0.0)
            assert table["fnr_system"][i] == pytest.approx(fn / max(int(np.sum(y == 1)), 1) if np.sum(y == 1) else 0.0)
        # the chosen row is the brute-force max-coverage row under the target
        i = pick_max_coverage(table, target=0.1, definition="conditional")
        ok = [k for k, (tp, fp, tn, fn, _) in enumerate(brute) if tp + fp + tn + fn > 0 and
              (fn / (fn + tp) if fn + tp else 0.0) <= 0.1]
        if ok:
            best = max(sum(brute[k][:4]) for k in ok)
            assert i is not None and int(table["exits"][i]) == best
        else:
            assert i is None


def test_decision_sweep_is_the_mcc_optimum():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.round(np.clip(rng.normal(0.5 + 0.2 * (y - 0.5), 0.2), 0, 1), 2)
    d = decision_sweep(p, y)
    brute = max(matthews_corrcoef(y, (p >= t).astype(int)) for t in np.unique(p))
    assert d["mcc"] == pytest.approx(brute)
    assert matthews_corrcoef(y, (p >= d["tau"]).astype(int)) == pytest.approx(d["mcc"])


def test_choose_t_pos():
    y = np.array([1, 1, 1, 0, 1, 0, 0])
    p = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.3, 0.1])
    assert choose_t_pos(p, y, max_fdr=0.0) == 0.9
    assert choose_t_pos(p, y, max_fdr=0.25) == 0.8


def test_counts_at_matches_direct():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    p = np.round(rng.random(400), 2)
    es = exit_scores(p, "max-softmax")
    grid = grid_from_select(es.score, size=50)
    c = counts_at(es, y, grid)
    for j, lam in enumerate(grid):
        ex = es.score >= lam
        assert c["fn"][j] == np.sum(ex & (es.decision == 0) & (y == 1))
        assert c["exits"][j] == ex.sum()


def test_upper_bound_is_clopper_pearson():
    from scipy.stats import binomtest

    for k, n in ((0, 114), (3, 500), (10, 200)):
        # scipy's exact two-sided interval at level 1 - 2*delta has the one-sided bound as its upper end
        assert upper_bound(k, n, 0.1) == pytest.approx(binomtest(k, n).proportion_ci(0.8, "exact").high, rel=1e-9)
    assert min_samples(0.02, 0.1) == 114 and min_samples(0.02, 0.05) == 149


def test_too_few_samples_says_so():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    p = np.clip(y * 0.9 + rng.random(60) * 0.1, 0, 1)  # perfectly separable: zero errors
    es = exit_scores(p, "max-softmax")
    rec = ltt_certify(es, y, grid_from_select(es.score), alpha=0.02, delta=0.1, definition="exits")
    assert rec["certified"] is False and rec["lam"] is None
    assert "needs at least 114" in rec["reason"]
    with pytest.raises(Stage1Error, match="fnr-definition"):
        ltt_certify(es, y, grid_from_select(es.score), definition="weird")


# ---------------------------------------------------------------------------------------
# statistical validation
def _population(n, rng):
    """A known score distribution: 40% positives; 70% of rows easy (p near 0 or 1), the
    rest hard (p near 0.5) -- confident exits plus a hard tail to defer."""
    y = (rng.random(n) < 0.4).astype(np.int64)
    easy = rng.random(n) < 0.7
    p = np.where(y == 1, np.where(easy, rng.beta(12, 1, n), rng.beta(2.5, 2, n)),
                 np.where(easy, rng.beta(1, 12, n), rng.beta(2, 2.5, n)))
    return p, y


class TrueRisk:
    """Population risk and coverage of any max-softmax threshold (1M rows, sorted once)."""

    def __init__(self, p, y):
        es = exit_scores(p, "max-softmax")
        order = np.argsort(-es.score, kind="stable")
        self.s, d, t = es.score[order], es.decision[order], y[order]
        self.cfn = np.r_[0, np.cumsum((d == 0) & (t == 1))]
        self.ctp = np.r_[0, np.cumsum((d == 1) & (t == 1))]
        self.pos = int(y.sum())

    def __call__(self, lam, definition):
        k = int(np.searchsorted(-self.s, -lam, side="right"))
        fn, tp = self.cfn[k], self.ctp[k]
        m = {"conditional": fn + tp, "exits": k, "system": self.pos}[definition]
        return (fn / m if m else 0.0), k / len(self.s)


@pytest.fixture(scope="module")
def population():
    return TrueRisk(*_population(1_000_000, np.random.default_rng(123)))


@pytest.mark.parametrize("definition", ["conditional", "exits", "system"])
def test_ltt_guarantee_over_500_splits(population, definition):
    alpha, delta, n, splits = 0.02, 0.1, 5000, 500
    rng = np.random.default_rng({"conditional": 1, "exits": 2, "system": 3}[definition])
    # oracle: the most permissive threshold whose population risk is <= alpha
    fine = np.unique(population.s[:: len(population.s) // 4000])[::-1]
    curve = np.array([population(lam, definition) for lam in fine])
    oracle_cov = curve[curve[:, 0] <= alpha, 1].max()
    violations, covs = 0, []
    for _ in range(splits):
        ps, ys = _population(n, rng)
        pc, yc = _population(n, rng)
        grid = ltt_grid(exit_scores(ps, "max-softmax"), ys, n_calib=n, definition=definition, alpha=alpha, delta=delta)
        rec = ltt_certify(exit_scores(pc, "max-softmax"), yc, grid, alpha=alpha, delta=delta, definition=definition)
        if rec["certified"]:
            r, cov = population(rec["lam"], definition)
            violations += r > alpha
            assert rec["upper_bound"] <= alpha + 1e-12
            covs.append(cov)
        else:
            covs.append(0.0)
    slack = 3 * np.sqrt(delta * (1 - delta) / splits)
    assert violations / splits <= delta + slack, (violations, splits)
    assert np.mean(covs) >= 0.8 * oracle_cov, (np.mean(covs), oracle_cov)


def test_crc_expected_risk(population):
    alpha, n = 0.02, 2000
    rng = np.random.default_rng(9)
    risks, certified = [], 0
    for _ in range(300):
        ps, _ = _population(n, rng)
        pc, yc = _population(n, rng)
        grid = grid_from_select(exit_scores(ps, "max-softmax").score)
        rec = crc_certify(exit_scores(pc, "max-softmax"), yc, grid, alpha=alpha)
        certified += rec["certified"]
        risks.append(population(rec["lam"], "system")[0] if rec["certified"] else 0.0)
    assert certified > 250
    assert np.mean(risks) <= alpha + 3 * np.std(risks) / np.sqrt(len(risks))
