"""Heads on cached features, and a grid of heads trained together on shared batches.

A :class:`Head` is the users' baseline ``Linear(D, 768)-ReLU-Dropout-Linear(768, K)``
(``kind='mlp'``) or one ``Linear(D, K)`` (``kind='linear'``). A :class:`HeadGrid` holds
many heads whose inputs are column ranges of one feature matrix; heads of one kind
and feature set are evaluated with one matrix product per layer (their weights
concatenated), so a grid of G heads costs far less than G separate passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("mlp", "linear")


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # 'mlp' or 'linear'
    features: str  # feature sets joined by '+', e.g. 'cls' or 'cls+patch_mean'
    lr: float  # peak learning rate
    weight_decay: float  # AdamW decoupled weight decay
    dropout: float  # dropout after the hidden layer (mlp only)
    hidden: int = 768  # hidden width (mlp only)

    @property
    def name(self) -> str:
        core = f"{self.kind}-{self.features}-lr{self.lr:g}-wd{self.weight_decay:g}"
        return core + (f"-do{self.dropout:g}-h{self.hidden}" if self.kind == "mlp" else "")

    def to_dict(self) -> dict:
        return asdict(self)


class Head(nn.Module):
    """One classification head: ``(B, D) -> (B, K)`` logits."""

    def __init__(self, in_dim: int, num_classes: int, *, kind: str = "mlp", hidden: int = 768,
                 dropout: float = 0.3) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
        self.kind, self.in_dim, self.num_classes, self.dropout = kind, in_dim, num_classes, dropout
        if kind == "mlp":
            self.fc1 = nn.Linear(in_dim, hidden)
            self.fc2 = nn.Linear(hidden, num_classes)
        else:
            self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.fc(x)
        h = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(h)


class HeadGrid(nn.Module):
    """Heads that share batches. ``forward(x)`` -> ``(G, B, K)`` logits.

    ``columns[name]`` gives the ``(start, stop)`` column range of each feature set in
    the matrix fed to ``forward``.
    """

    def __init__(self, specs: Sequence[HeadSpec], columns: dict[str, tuple[int, int]], num_classes: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.columns = dict(columns)
        self.num_classes = num_classes
        self.heads = nn.ModuleList()
        self.slices: list[tuple[int, int]] = []
        for s in self.specs:
            lo, hi = self.feature_range(s.features)
            self.slices.append((lo, hi))
            self.heads.append(Head(hi - lo, num_classes, kind=s.kind, hidden=s.hidden, dropout=s.dropout))
        # Groups of heads computed together: same kind, same input columns, same hidden width.
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.specs):
            groups.setdefault((s.kind, self.slices[i], s.hidden if s.kind == "mlp" else 0), []).append(i)
        self.groups = list(groups.items())
        # Dropout's random bits on a CPU (seeded from torch's RNG: torch.manual_seed governs it).
        self._rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        self._drop_consts: dict[tuple, tuple] = {}

    def feature_range(self, features: str) -> tuple[int, int]:
        parts = features.split("+")
        missing = [p for p in parts if p not in self.columns]
        if missing:
            raise KeyError(f"feature set(s) {missing} not among {sorted(self.columns)}")
        spans = sorted(self.columns[p] for p in parts)
        for (_, b), (a, _) in zip(spans, spans[1:], strict=False):
            if a != b:
                raise KeyError(f"feature sets {parts} are not adjacent columns")
        return spans[0][0], spans[-1][1]

    def _dropout(self, hid: torch.Tensor, rates: list[float], hidden: int) -> torch.Tensor:
        """Inverted dropout with a rate per head (column block).

        On a CPU the keep-mask comes from 16 random bits per unit drawn by numpy's PCG64
        (several times faster than torch's CPU ``uniform_``, which otherwise dominates a
        head's step); rates are exact to 1/65536. On a GPU, torch's own RNG is used.
        The per-column thresholds and multipliers are built once per group.
        """
        if all(p == 0 for p in rates):
            return hid
        key = (tuple(rates), hidden, hid.device, hid.dtype)
        if key not in self._drop_consts:
            keep = np.repeat(1.0 - np.asarray(rates, dtype=np.float64), hidden)
            thresh = np.round(keep * 65536.0).astype(np.uint32)
            inv = 1.0 / (thresh / 65536.0 if hid.device.type == "cpu" else keep)
            self._drop_consts[key] = (thresh, torch.as_tensor(keep, dtype=hid.dtype, device=hid.device),
                                      torch.as_tensor(inv, dtype=hid.dtype, device=hid.device))
        thresh, keep, inv = self._drop_consts[key]
        if hid.device.type == "cpu":
            bits = np.frombuffer(self._rng.bytes(2 * hid.numel()), dtype=np.uint16).reshape(hid.shape)
            mask = torch.from_numpy(bits < thresh)
        else:
            mask = torch.rand_like(hid) < keep
        # One float multiplier (0 or 1/keep) so forward and backward are a single multiply each.
        return hid * mask.to(hid.dtype).mul_(inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((len(self.heads), x.shape[0], self.num_classes))
        for (kind, (lo, hi), hidden), idx in self.groups:
            xs = x[:, lo:hi]
            heads = [self.heads[i] for i in idx]
            g = len(idx)
            if kind == "linear":
                w = torch.cat([h.fc.weight for h in heads]) if g > 1 else heads[0].fc.weight
                b = torch.cat([h.fc.bias for h in heads]) if g > 1 else heads[0].fc.bias
                out[idx] = F.linear(xs, w, b).view(-1, g, self.num_classes).transpose(0, 1)
                continue
            w1 = torch.cat([h.fc1.weight for h in heads]) if g > 1 else heads[0].fc1.weight
            b1 = torch.cat([h.fc1.bias for h in heads]) if g > 1 else heads[0].fc1.bias
            hid = F.relu(F.linear(xs, w1, b1))  # (B, g * hidden)
            if self.training:
                hid = self._dropout(hid, [h.dropout for h in heads], hidden)
            if g == 1:
                out[idx[0]] = F.linear(hid, heads[0].fc2.weight, heads[0].fc2.bias)
                continue
            w2 = torch.stack([h.fc2.weight.t() for h in heads])  # (g, hidden, K)
            b2 = torch.stack([h.fc2.bias for h in heads])  # (g, K)
            hid = hid.view(-1, g, hidden).transpose(0, 1)  # (g, B, hidden)
            out[idx] = torch.baddbmm(b2.unsqueeze(1), hid, w2)
        return out
