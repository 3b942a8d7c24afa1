"""Classification and selective-prediction metrics: plain functions on arrays.

Conventions: ``labels`` is ``(N,)`` int in ``[0, K)``; ``probs`` is ``(N, K)`` with rows
summing to 1, or ``(N,)`` = probability of class 1 in the binary case. Metrics that
scikit-learn has come from scikit-learn.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm


def as_prob_matrix(probs: np.ndarray) -> np.ndarray:
    """``(N,)`` positive-class probabilities -> ``(N, 2)``; ``(N, K)`` unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1) if p.ndim == 1 else p


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(labels: np.ndarray, probs: np.ndarray, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class."""
    p = as_prob_matrix(probs)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], eps, 1.0))))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label
    (for K = 2 this is twice scikit-learn's binary ``brier_score_loss``)."""
    p = as_prob_matrix(probs)
    onehot = np.eye(p.shape[1])[labels]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def ece(labels: np.ndarray, probs: np.ndarray, *, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error of the top-label confidence.

    ``strategy='uniform'``: equal-width bins (ECE); ``'quantile'``: equal-mass bins (ACE).
    """
    p = as_prob_matrix(probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    elif strategy == "quantile":
        order = np.argsort(conf, kind="stable")
        bins = np.empty(len(conf), dtype=np.int64)
        bins[order] = np.arange(len(conf)) * n_bins // max(len(conf), 1)
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / max(len(conf), 1))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, MCC, AUROC, NLL, Brier, ECE/ACE at the argmax decision."""
    with warnings.catch_warnings():  # small or one-class splits: the figures are still defined
        warnings.simplefilter("ignore", UserWarning)
        return _classification_metrics(np.asarray(labels), as_prob_matrix(probs))


def _classification_metrics(labels: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    pred = p.argmax(axis=1)
    k = p.shape[1]
    out: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)) if len(labels) else float("nan"),
        "mcc": float(skm.matthews_corrcoef(labels, pred)) if len(labels) else float("nan"),
        "nll": nll(labels, p), "brier": brier(labels, p),
        "ece": ece(labels, p), "ace": ece(labels, p, strategy="quantile"),
    }
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif k == 2:
        out["auroc"] = float(skm.roc_auc_score(labels, p[:, 1]))
    elif len(present) == k:
        out["auroc"] = float(skm.roc_auc_score(labels, p, multi_class="ovr"))
    else:
        out["auroc"] = float("nan")
    return out


METRIC_NAMES = ("accuracy", "balanced_accuracy", "mcc", "auroc", "nll", "brier", "ece", "ace")
HIGHER_IS_BETTER = {"accuracy": True, "balanced_accuracy": True, "mcc": True, "auroc": True,
                    "nll": False, "brier": False, "ece": False, "ace": False}


# ---------------------------------------------------------------------------------------
# Selective prediction (risk-coverage). ``confidence`` ranks rows: high = answered first.
def _risk_coverage(errors: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and selective risk after each distinct confidence level (ties together)."""
    order = np.argsort(-confidence, kind="stable")
    e = errors[order].astype(np.float64)
    c = confidence[order]
    last = np.r_[np.flatnonzero(c[1:] != c[:-1]), len(c) - 1]  # end of each tie block
    cum = np.cumsum(e)[last]
    k = last + 1
    return k / len(e), cum / k


def aurc(errors: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): mean selective risk over
    the coverages 1/N..1, tie blocks sharing their risk."""
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) == 0:
        return float("nan")
    cov, risk = _risk_coverage(errors, np.asarray(confidence, dtype=np.float64))
    widths = np.diff(np.r_[0.0, cov])
    return float(np.sum(widths * risk))


def optimal_aurc(errors: np.ndarray) -> float:
    """AURC of a perfect ranking (all correct rows first)."""
    errors = np.asarray(errors, dtype=np.float64)
    n, m = len(errors), errors.sum()
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(0.0, k - (n - m)) / k))


def e_aurc(errors: np.ndarray, confidence: np.ndarray) -> float:
    """Excess AURC: AURC minus that of the perfect ranking of the same errors."""
    return aurc(errors, confidence) - optimal_aurc(errors)


def augrc(errors: np.ndarray, confidence: np.ndarray) -> float:
    """Area under the generalised risk-coverage curve (Traub et al. 2024): the generalised
    risk at coverage c is (errors among the answered) / N."""
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) == 0:
        return float("nan")
    cov, risk = _risk_coverage(errors, np.asarray(confidence, dtype=np.float64))
    widths = np.diff(np.r_[0.0, cov])
    return float(np.sum(widths * risk * cov))


def clopper_pearson(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial confidence interval for k successes in n trials."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    a = (1.0 - level) / 2.0
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def bootstrap_ci(fn, *arrays: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(*arrays)`` resampling rows."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(*(a[idx] for a in arrays))
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1.0 - a))


def selective_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AURC, E-AURC, AUGRC of max-probability confidence with argmax errors."""
    p = as_prob_matrix(probs)
    conf = p.max(axis=1)
    err = (p.argmax(axis=1) != np.asarray(labels)).astype(np.float64)
    return {"aurc": aurc(err, conf), "e_aurc": e_aurc(err, conf), "augrc": augrc(err, conf)}
