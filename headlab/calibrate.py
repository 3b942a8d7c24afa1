"""Post-hoc calibration maps: temperature, Dirichlet (ODIR), beta, isotonic.

All maps take logits ``(N, K)`` (log-probabilities work too: any row-wise shift of
logits gives the same softmax) and return probabilities ``(N, K)``. Parameters
round-trip through JSON exactly (:meth:`Calibrator.to_dict` / :func:`from_dict`).

* temperature: ``softmax(z / T)`` (Guo et al. 2017), T fitted by NLL.
* dirichlet: ``softmax(W ln p + b)`` fitted by NLL + ODIR (Kull et al. 2019, Sec. 4):
  ``lam * mean of squared off-diagonal W + mu * mean of squared b``, regularisation
  chosen by k-fold cross-validation; ``full`` or ``diagonal`` W.
* beta (binary): ``logit q = a ln p - b ln(1 - p) + c`` with ``a, b >= 0`` (Kull et al.
  2017): monotone by construction.
* isotonic: scikit-learn's IsotonicRegression on the positive-class probability
  (one-vs-rest and renormalised for K > 2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax

from cache.errors import Stage1Error

METHODS = ("temperature", "dirichlet", "beta", "isotonic")
ODIR_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CV_MAX_ROWS = 100_000


def _nll_from_logits(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))


class Calibrator:
    method = "identity"

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        raise NotImplementedError

    def transform_logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated log-probabilities (N, K)."""
        raise NotImplementedError

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return softmax(self.transform_logits(np.asarray(logits, dtype=np.float64)), axis=1)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class Identity(Calibrator):
    method = "identity"

    def __init__(self, num_classes: int = 2) -> None:
        self.num_classes = num_classes

    def fit(self, logits, labels):
        self.num_classes = np.asarray(logits).shape[1]
        return self

    def transform_logits(self, logits):
        return log_softmax(np.asarray(logits, dtype=np.float64), axis=1)

    def to_dict(self):
        return {"method": self.method, "num_classes": self.num_classes, "params": {}}


class Temperature(Calibrator):
    method = "temperature"

    def __init__(self, temperature: float = 1.0, num_classes: int = 2) -> None:
        self.temperature, self.num_classes = float(temperature), num_classes

    def fit(self, logits, labels):
        z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
        self.num_classes = z.shape[1]
        res = minimize_scalar(lambda lt: _nll_from_logits(z / np.exp(lt), y), bounds=(-6.0, 6.0), method="bounded",
                              options={"xatol": 1e-7})
        self.temperature = float(np.exp(res.x))
        return self

    def transform_logits(self, logits):
        return log_softmax(np.asarray(logits, dtype=np.float64) / self.temperature, axis=1)

    def to_dict(self):
        return {"method": self.method, "num_classes": self.num_classes, "params": {"temperature": self.temperature}}


class Dirichlet(Calibrator):
    method = "dirichlet"

    def __init__(self, *, variant: str = "full", lam: float | None = None, mu: float | None = None,
                 W: np.ndarray | None = None, b: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> None:
        if variant not in ("full", "diagonal"):
            raise Stage1Error(f"Dirichlet variant {variant!r}: choose full or diagonal")
        self.variant, self.lam, self.mu, self.folds, self.seed = variant, lam, mu, folds, seed
        self.W = None if W is None else np.asarray(W, dtype=np.float64)
        self.b = None if b is None else np.asarray(b, dtype=np.float64)
        self.cv: list[dict[str, float]] = []

    @staticmethod
    def _fit_once(x: np.ndarray, y: np.ndarray, lam: float, mu: float, variant: str) -> tuple[np.ndarray, np.ndarray]:
        n, k = x.shape
        onehot = np.eye(k)[y]
        off = 1.0 - np.eye(k)
        n_off = max(k * (k - 1), 1)

        def unpack(theta):
            if variant == "full":
                return theta[: k * k].reshape(k, k), theta[k * k:]
            return np.diag(theta[:k]), theta[k:]

        def f(theta):
            W, b = unpack(theta)
            z = x @ W.T + b
            lp = log_softmax(z, axis=1)
            loss = -np.mean(np.sum(onehot * lp, axis=1))
            loss += lam * np.sum((W * off) ** 2) / n_off + mu * np.sum(b ** 2) / k
            g = (np.exp(lp) - onehot) / n  # (n, k)
            gW = g.T @ x + 2.0 * lam * (W * off) / n_off
            gb = g.sum(0) + 2.0 * mu * b / k
            return loss, (np.r_[gW.ravel(), gb] if variant == "full" else np.r_[np.diag(gW), gb])

        theta0 = np.r_[np.eye(k).ravel(), np.zeros(k)] if variant == "full" else np.r_[np.ones(k), np.zeros(k)]
        res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-9})
        return unpack(res.x)

    def fit(self, logits, labels):
        x = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
        y = np.asarray(labels)
        if self.lam is None or self.mu is None:
            self.lam, self.mu = self._choose_reg(x, y)
        self.W, self.b = self._fit_once(x, y, self.lam, self.mu, self.variant)
        return self

    def _choose_reg(self, x, y) -> tuple[float, float]:
        """ODIR strength by k-fold cross-validated NLL (lam = mu, as a one-dimensional grid),
        on at most ``CV_MAX_ROWS`` random rows: the choice needs no more, the final fit uses all."""
        rng = np.random.default_rng(self.seed)
        if len(y) > CV_MAX_ROWS:
            keep = rng.choice(len(y), CV_MAX_ROWS, replace=False)
            x, y = x[keep], y[keep]
        folds = min(self.folds, max(2, len(y) // 20))
        fold = rng.permutation(len(y)) % folds
        best, best_reg = np.inf, ODIR_GRID[0]
        self.cv = []
        for reg in ODIR_GRID:
            losses = []
            for f in range(folds):
                tr, te = fold != f, fold == f
                if len(np.unique(y[tr])) < 2:
                    continue
                W, b = self._fit_once(x[tr], y[tr], reg, reg, self.variant)
                losses.append(_nll_from_logits(x[te] @ W.T + b, y[te]))
            score = float(np.mean(losses)) if losses else np.inf
            self.cv.append({"lam": reg, "mu": reg, "cv_nll": score})
            if score < best - 1e-12:
                best, best_reg = score, reg
        return best_reg, best_reg

    def transform_logits(self, logits):
        x = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
        return log_softmax(x @ self.W.T + self.b, axis=1)

    def to_dict(self):
        return {"method": self.method, "num_classes": int(self.W.shape[0]),
                "params": {"variant": self.variant, "W": self.W.tolist(), "b": self.b.tolist(),
                           "lam": self.lam, "mu": self.mu}, "cv": self.cv}


def _binary_logs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ln p, ln(1 - p)) of the positive class, computed stably from logits."""
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[1] != 2:
        raise Stage1Error(f"beta calibration is for two classes; these outputs have {z.shape[1]}: use dirichlet")
    lp = log_softmax(z, axis=1)
    return lp[:, 1], lp[:, 0]


class Beta(Calibrator):
    method = "beta"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0) -> None:
        self.a, self.b, self.c = float(a), float(b), float(c)

    def fit(self, logits, labels):
        lnp, ln1p = _binary_logs(logits)
        y = np.asarray(labels, dtype=np.float64)
        x1, x2 = lnp, -ln1p

        def f(theta):
            a, b, c = theta
            s = a * x1 + b * x2 + c
            # NLL of a logistic model: log(1 + e^s) - y s, stably
            loss = np.mean(np.logaddexp(0.0, s) - y * s)
            g = 1.0 / (1.0 + np.exp(-s)) - y
            return loss, np.array([np.mean(g * x1), np.mean(g * x2), np.mean(g)])

        res = minimize(f, np.array([1.0, 1.0, 0.0]), jac=True, method="L-BFGS-B",
                       bounds=[(0.0, None), (0.0, None), (None, None)], options={"maxiter": 1000, "gtol": 1e-10})
        self.a, self.b, self.c = (float(v) for v in res.x)
        return self

    def transform_logits(self, logits):
        lnp, ln1p = _binary_logs(logits)
        s = self.a * lnp - self.b * ln1p + self.c
        return np.stack([-np.logaddexp(0.0, s), -np.logaddexp(0.0, -s)], axis=1)

    def to_dict(self):
        return {"method": self.method, "num_classes": 2, "params": {"a": self.a, "b": self.b, "c": self.c}}


class Isotonic(Calibrator):
    method = "isotonic"

    def __init__(self, knots: list[dict[str, list[float]]] | None = None) -> None:
        self.knots = knots or []  # per calibrated class: {"x": [...], "y": [...]}

    def fit(self, logits, labels):
        from sklearn.isotonic import IsotonicRegression

        p = softmax(np.asarray(logits, dtype=np.float64), axis=1)
        y = np.asarray(labels)
        classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
        self.knots = []
        for k in classes:
            ir = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(p[:, k], (y == k).astype(float))
            self.knots.append({"x": ir.X_thresholds_.tolist(), "y": ir.y_thresholds_.tolist()})
        self.num_classes = p.shape[1]
        return self

    def transform_logits(self, logits):
        p = softmax(np.asarray(logits, dtype=np.float64), axis=1)
        eps = 1e-12
        if p.shape[1] == 2:
            q1 = np.interp(p[:, 1], self.knots[0]["x"], self.knots[0]["y"])
            q = np.stack([1.0 - q1, q1], axis=1)
        else:
            q = np.stack([np.interp(p[:, k], kn["x"], kn["y"]) for k, kn in enumerate(self.knots)], axis=1)
            s = q.sum(1, keepdims=True)
            q = np.where(s > 0, q / np.where(s > 0, s, 1.0), 1.0 / p.shape[1])
        return np.log(np.clip(q, eps, 1.0))

    def to_dict(self):
        return {"method": self.method, "num_classes": int(getattr(self, "num_classes", 2)),
                "params": {"knots": self.knots}}


def make_calibrator(method: str, *, variant: str = "full", seed: int = 0) -> Calibrator:
    if method == "temperature":
        return Temperature()
    if method == "dirichlet":
        return Dirichlet(variant=variant, seed=seed)
    if method == "beta":
        return Beta()
    if method == "isotonic":
        return Isotonic()
    if method == "identity":
        return Identity()
    raise Stage1Error(f"--method {method!r}: choose one of {list(METHODS)}")


def from_dict(d: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from :meth:`Calibrator.to_dict` output."""
    m, p = d["method"], d["params"]
    if m == "identity":
        return Identity(d.get("num_classes", 2))
    if m == "temperature":
        return Temperature(p["temperature"], d.get("num_classes", 2))
    if m == "dirichlet":
        return Dirichlet(variant=p["variant"], lam=p["lam"], mu=p["mu"], W=np.array(p["W"]), b=np.array(p["b"]))
    if m == "beta":
        return Beta(p["a"], p["b"], p["c"])
    if m == "isotonic":
        c = Isotonic(p["knots"])
        c.num_classes = d.get("num_classes", 2)
        return c
    raise Stage1Error(f"unknown calibration method {m!r} in calibration parameters")
