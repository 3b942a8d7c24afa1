"""Calibration maps and metrics against independent implementations and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    log_loss,
    matthews_corrcoef,
    roc_auc_score,
)

from headlab import metrics as M
from headlab.calibrate import Beta, Dirichlet, Isotonic, Temperature, from_dict


def _binary_logits(n, scale, seed):
    """True logit s, label ~ Bernoulli(sigmoid(s)); the model reports scale * s."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 2, n)
    y = (rng.random(n) < expit(s)).astype(np.int64)
    z = np.stack([np.zeros(n), scale * s], axis=1)
    return z, y


@pytest.mark.parametrize("cls", [Temperature, lambda: Dirichlet(variant="full"), Beta, Isotonic])
def test_calibration_fixes_overconfidence_and_keeps_calibrated(cls):
    ztr, ytr = _binary_logits(4000, 3.0, 0)
    zte, yte = _binary_logits(4000, 3.0, 1)
    cal = cls().fit(ztr, ytr)
    before = M.nll(yte, softmax(zte, axis=1))
    after = M.nll(yte, cal.predict_proba(zte))
    assert after < before - 0.05
    # already calibrated: nearly unchanged
    ztr, ytr = _binary_logits(4000, 1.0, 2)
    zte, yte = _binary_logits(4000, 1.0, 3)
    cal = cls().fit(ztr, ytr)
    assert M.nll(yte, cal.predict_proba(zte)) <= M.nll(yte, softmax(zte, axis=1)) + 0.01
    # JSON round trip reproduces predictions exactly
    again = from_dict(cal.to_dict())
    np.testing.assert_array_equal(again.predict_proba(zte), cal.predict_proba(zte))


def test_beta_matches_logistic_regression_on_log_features():
    z, y = _binary_logits(5000, 2.5, 4)
    p = softmax(z, axis=1)[:, 1]
    b = Beta().fit(z, y)
    X = np.stack([np.log(p), -np.log1p(-p)], axis=1)
    lr = LogisticRegression(C=np.inf, max_iter=10000, tol=1e-10).fit(X, y)  # unpenalised
    assert lr.coef_.min() >= 0  # the unconstrained optimum is monotone here
    ours = M.nll(y, b.predict_proba(z))
    theirs = log_loss(y, lr.predict_proba(X))
    assert abs(ours - theirs) < 1e-4
    assert b.a >= 0 and b.b >= 0


def test_temperature_recovers_scale():
    z, y = _binary_logits(20000, 2.0, 5)
    t = Temperature().fit(z, y)
    assert t.temperature == pytest.approx(2.0, rel=0.08)


def test_dirichlet_multiclass_and_cv():
    rng = np.random.default_rng(6)
    n, k = 3000, 3
    s = rng.normal(0, 1.5, (n, k))
    y = np.array([rng.choice(k, p=softmax(r)) for r in s])
    z = 2.5 * s[:, [1, 0, 2]] * 0.7 + s * 0.3  # miscalibrated and mixed-up classes
    d = Dirichlet(variant="full").fit(z[:2000], y[:2000])
    assert len(d.cv) >= 3 and d.lam in [c["lam"] for c in d.cv]
    assert M.nll(y[2000:], d.predict_proba(z[2000:])) < M.nll(y[2000:], softmax(z[2000:], axis=1)) - 0.05
    diag = Dirichlet(variant="diagonal").fit(z[:2000], y[:2000])
    assert np.allclose(diag.W, np.diag(np.diag(diag.W)))


def test_metrics_against_sklearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 1000)
    p = np.clip(rng.random(1000) * 0.6 + 0.4 * y, 1e-6, 1 - 1e-6)
    m = M.classification_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["nll"] == pytest.approx(log_loss(y, p))
    assert m["brier"] == pytest.approx(2 * brier_score_loss(y, p))


def test_ece_properties():
    rng = np.random.default_rng(8)
    conf = rng.uniform(0.5, 1.0, 200_000)
    y_hat_correct = rng.random(200_000) < conf
    p1 = np.where(y_hat_correct, conf, 1 - conf)  # predicted class 1 with prob conf, label 1 iff correct
    y = np.ones(200_000, dtype=int)
    assert M.ece(y, p1) < 0.01 and M.ece(y, p1, strategy="quantile") < 0.01
    assert M.ece(y, np.clip(p1 * 0.8 + 0.2, 0, 1)) > 0.05


def test_aurc_against_brute_force():
    rng = np.random.default_rng(9)
    err = (rng.random(300) < 0.2).astype(float)
    conf = np.round(rng.random(300), 1)  # ties
    # brute force: mean selective risk over coverages k/N, tie blocks taken whole
    order = np.argsort(-conf, kind="stable")
    risks = []
    for k in range(1, 301):
        lam = conf[order][k - 1]
        sel = conf >= lam
        risks.append(err[sel].mean())
    assert M.aurc(err, conf) == pytest.approx(np.mean(risks))
    assert M.e_aurc(err, conf) >= -1e-12
    assert M.e_aurc(err, -err + 1e-3 * rng.random(300)) == pytest.approx(0.0, abs=1e-12)  # perfect ranking
    assert 0 <= M.augrc(err, conf) <= M.aurc(err, conf)


def test_clopper_pearson_against_scipy():
    from scipy.stats import binomtest

    for k, n in ((0, 50), (7, 100), (100, 100)):
        lo, hi = M.clopper_pearson(k, n, level=0.9)
        ci = binomtest(k, n).proportion_ci(0.9, "exact")
        assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)
