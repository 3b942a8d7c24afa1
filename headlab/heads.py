"""Heads on cached features, and a grid of heads trained together on shared batches.

A :class:`Head` is the users' baseline ``Linear(D, 768)-ReLU-Dropout-Linear(768, K)``
(``kind='mlp'``) or one ``Linear(D, K)`` (``kind='linear'``). A :class:`HeadGrid` holds
many heads whose inputs are column ranges of one feature matrix; heads of one kind
and feature set are stored stacked and evaluated with one matrix product per layer, so
a grid of G heads costs far less than G separate passes.
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


def eval_chunk_rows(width: int, budget_bytes: int = 4 << 20) -> int:
    """Rows per chunk when evaluating on many rows: one ``(rows, width)`` float32
    activation (``width``: a head's hidden units, summed over a grid) stays near
    ``budget_bytes``. Small temporaries, and outputs written into one array made
    beforehand, keep glibc's heap from growing chunk after chunk: with 33 MB chunks and
    per-chunk outputs kept in a list, scoring 200k rows grew the process by ~800 MB;
    like this, by ~40 MB."""
    return max(256, budget_bytes // (4 * max(int(width), 1)))


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

    @property
    def width(self) -> int:
        """Widest activation per row (hidden units, or the logits of a linear head)."""
        return self.fc1.out_features if self.kind == "mlp" else self.num_classes

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """``(N, K)`` float32 logits of ``(N, D)`` rows, in eval mode, in chunks of
        :func:`eval_chunk_rows` rows (the head's mode is restored after)."""
        was = self.training
        self.eval()
        out = np.empty((len(x), self.num_classes), np.float32)
        try:
            step = eval_chunk_rows(self.width)
            for s in range(0, len(x), step):
                out[s:s + step] = self(torch.as_tensor(x[s:s + step], dtype=torch.float32)).float().numpy()
        finally:
            self.train(was)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.fc(x)
        h = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(h)


class _Stack(nn.Module):
    """The heads of one group (same kind, input columns and hidden width), each parameter
    stacked along dim 0, one slice per head.

    Heads of a group may differ in learning rate. A head's weights are stored divided by
    its ``scale = lr / lr_ref`` (``lr_ref``: the group's largest lr), and the forward
    multiplies the layer outputs back by ``scale``; with one AdamW learning rate
    ``lr_ref`` for the stack, each head then moves at its own ``lr`` (Adam's step does not
    depend on the gradient's scale; epsilon acts as ``eps / scale``, negligible at 1e-8).
    Decoupled weight decay, which does depend on the head, is applied by AdamW itself
    where ``scale * weight_decay`` is the same for every head of the stack, else by
    :meth:`HeadGrid.decay_`, one multiply per stacked tensor.
    """

    def __init__(self, kind: str, heads: Sequence[Head], specs: Sequence[HeadSpec]) -> None:
        super().__init__()
        self.kind, self.g = kind, len(heads)
        lrs = [s.lr for s in specs]
        self.lr_ref = max(lrs)
        scale = torch.tensor([lr / self.lr_ref for lr in lrs], dtype=torch.float32)
        self.scaled = bool((scale != 1).any())
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("weight_decay", torch.tensor([s.weight_decay for s in specs], dtype=torch.float32),
                             persistent=False)
        names = ("fc.weight", "fc.bias") if kind == "linear" else ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
        self.names = names
        with torch.no_grad():
            for n in names:
                t = torch.stack([h.get_parameter(n).detach() for h in heads])
                self.register_parameter(n.replace(".", "_"), nn.Parameter(t / self._view(scale, t.dim())))
        if kind == "mlp":
            hidden = self.fc1_weight.shape[1]
            self.register_buffer("scale_hidden", scale.repeat_interleave(hidden), persistent=False)
        k = self.fc_weight.shape[1] if kind == "linear" else self.fc2_weight.shape[1]
        self.register_buffer("scale_out", scale.repeat_interleave(k), persistent=False)

    @staticmethod
    def _view(v: torch.Tensor, dim: int) -> torch.Tensor:
        return v.view(-1, *([1] * (dim - 1)))

    def stacked(self) -> list[torch.Tensor]:
        return [self.get_parameter(n.replace(".", "_")) for n in self.names]

    def head_state(self, pos: int) -> dict[str, torch.Tensor]:
        """Head ``pos``'s weights as a :class:`Head` state dict (scale folded back in)."""
        s = self.scale[pos]
        return {n: (p[pos] * s).detach() for n, p in zip(self.names, self.stacked(), strict=True)}

    @torch.no_grad()
    def load_head_state(self, pos: int, state: dict[str, torch.Tensor]) -> None:
        s = self.scale[pos]
        for n, p in zip(self.names, self.stacked(), strict=True):
            p[pos].copy_(state[n].to(p.device, p.dtype) / s)


class HeadGrid(nn.Module):
    """Heads that share batches. ``forward(x)`` -> ``(G, B, K)`` logits.

    ``columns[name]`` gives the ``(start, stop)`` column range of each feature set in
    the matrix fed to ``forward``. Heads of one kind, feature set and hidden width live
    in one :class:`_Stack` and are evaluated with one matrix product per layer, and
    optimised, clipped, decayed and averaged (EMA) as a few stacked tensors: the cost of
    a grid grows with its FLOPs, not with its number of heads. :meth:`head` and
    :meth:`head_state` give each head back as a plain :class:`Head`.
    """

    def __init__(self, specs: Sequence[HeadSpec], columns: dict[str, tuple[int, int]], num_classes: int) -> None:
        super().__init__()
        self.specs = list(specs)
        self.columns = dict(columns)
        self.num_classes = num_classes
        self.slices: list[tuple[int, int]] = []
        heads = []
        for s in self.specs:  # created one by one, so a seed gives the same initial weights as single heads
            lo, hi = self.feature_range(s.features)
            self.slices.append((lo, hi))
            heads.append(Head(hi - lo, num_classes, kind=s.kind, hidden=s.hidden, dropout=s.dropout))
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.specs):
            groups.setdefault((s.kind, self.slices[i], s.hidden if s.kind == "mlp" else 0), []).append(i)
        self.groups = list(groups.items())
        self.stacks = nn.ModuleList(_Stack(kind, [heads[i] for i in idx], [self.specs[i] for i in idx])
                                    for (kind, _, _), idx in self.groups)
        self._where = {g: (gi, pos) for gi, (_, idx) in enumerate(self.groups) for pos, g in enumerate(idx)}
        # Dropout's random bits on a CPU (seeded from torch's RNG: torch.manual_seed governs it).
        self._bits = np.random.SFC64(int(torch.randint(0, 2**62, (1,)).item()))
        self._drop_consts: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def width(self) -> int:
        """Hidden units of all heads together (logits for linear heads): the widest activation per row."""
        return sum(s.hidden if s.kind == "mlp" else self.num_classes for s in self.specs)

    def head_state(self, g: int) -> dict[str, torch.Tensor]:
        """Head ``g``'s weights as a :class:`Head` state dict."""
        gi, pos = self._where[g]
        return self.stacks[gi].head_state(pos)

    def load_head_state(self, g: int, state: dict[str, torch.Tensor]) -> None:
        gi, pos = self._where[g]
        self.stacks[gi].load_head_state(pos, state)

    def head(self, g: int) -> Head:
        """Head ``g`` as a stand-alone :class:`Head` (a copy, on the CPU, in the grid's
        train/eval mode)."""
        s = self.specs[g]
        lo, hi = self.slices[g]
        h = Head(hi - lo, self.num_classes, kind=s.kind, hidden=s.hidden, dropout=s.dropout)
        h.load_state_dict({k: v.cpu() for k, v in self.head_state(g).items()})
        return h.train(self.training)

    @property
    def heads(self) -> list[Head]:
        return [self.head(g) for g in range(len(self.specs))]

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups: one per stack, at its reference lr. Where every head
        of a stack has the same ``scale * weight_decay`` (one head, or one lr and one decay),
        AdamW applies the decay itself; otherwise :meth:`decay_` does, per head."""
        out = []
        for st in self.stacks:
            eff = st.scale * st.weight_decay
            uniform = bool((eff == eff[0]).all())
            st.own_decay = not uniform
            out.append({"params": st.stacked(), "lr": st.lr_ref, "weight_decay": float(eff[0]) if uniform else 0.0})
        return out

    @torch.no_grad()
    def decay_(self, group_lrs: Sequence[float]) -> None:
        """Decoupled weight decay, ``p <- p * (1 - lr * wd)`` per head, as AdamW applies it
        before its update, for the stacks whose heads differ in it (see
        :meth:`param_groups`); ``group_lrs``: the current lr of each parameter group."""
        for st, lr in zip(self.stacks, group_lrs, strict=True):
            if not getattr(st, "own_decay", True) or not bool((st.weight_decay != 0).any()):
                continue
            f = 1.0 - lr * st.scale * st.weight_decay
            for p in st.stacked():
                p.mul_(st._view(f, p.dim()))

    @torch.no_grad()
    def clip_grad_per_head_(self, max_norm: float) -> None:
        """Clip each head's gradient to ``max_norm`` (L2 over that head's parameters, in
        the head's own units), as ``clip_grad_norm_`` would per head. One read of the
        gradients for the norms; they are rescaled only where a head's norm is too large."""
        for st in self.stacks:
            ps = [p for p in st.stacked() if p.grad is not None]
            if not ps:
                continue
            rows = [r for p in ps for r in p.grad.unbind(0)]  # one tensor per (parameter, head)
            sq = torch.stack(torch._foreach_norm(rows)).view(len(ps), st.g).square_().sum(0)
            norm = sq.sqrt_() / st.scale  # stored weights carry 1/scale: their gradients carry scale
            coef = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
            if bool((coef < 1.0).any()):
                for p in ps:
                    p.grad.mul_(st._view(coef, p.dim()))

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

    def _dropout_mask(self, z: torch.Tensor, rates: list[float], hidden: int
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep-mask ``(B, g*hidden)`` of inverted dropout with a rate per head (column
        block), and each head's ``1/keep`` (folded into its output layer's weights by the
        caller, which saves a full pass over the hidden activations each way). None when
        no head drops anything.

        On a CPU the mask comes from 16 random bits per unit, raw outputs of numpy's SFC64
        generator (many times faster than torch's CPU ``uniform_``, which otherwise
        dominates a head's step), as a uint8 tensor (multiplying by it is several times
        cheaper than by a bool one); rates are exact to 1/65536. On a GPU, torch's own RNG.
        """
        if all(p == 0 for p in rates):
            return None
        key = (tuple(rates), hidden, z.device)
        if key not in self._drop_consts:
            keep = 1.0 - np.asarray(rates, dtype=np.float64)
            thresh = np.round(keep * 65536.0).astype(np.uint32)  # keep a unit if its 16 bits < thresh
            eff = thresh / 65536.0 if z.device.type == "cpu" else keep  # the keep rate actually drawn
            self._drop_consts[key] = (np.repeat(thresh - 1, hidden).astype(np.uint16),
                                      torch.as_tensor(np.repeat(keep, hidden), dtype=torch.float32, device=z.device),
                                      torch.as_tensor(1.0 / eff, dtype=torch.float32, device=z.device))
        thresh, keep, inv = self._drop_consts[key]
        if z.device.type == "cpu":
            n = z.numel()
            bits = self._bits.random_raw((n + 3) // 4).view(np.uint16)[:n].reshape(z.shape)
            mask = torch.from_numpy(bits <= thresh).view(torch.uint8)
        else:
            mask = torch.rand(z.shape, device=z.device) < keep
        return mask, inv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((len(self.specs), x.shape[0], self.num_classes))
        k = self.num_classes
        for ((kind, (lo, hi), hidden), idx), st in zip(self.groups, self.stacks, strict=True):
            xs = x[:, lo:hi]
            g = len(idx)
            if kind == "linear":
                z = F.linear(xs, st.fc_weight.view(g * k, -1), st.fc_bias.view(-1))
                if st.scaled:
                    z = z * st.scale_out
                out[idx] = z.view(-1, g, k).transpose(0, 1)
                continue
            z = F.linear(xs, st.fc1_weight.view(g * hidden, -1), st.fc1_bias.view(-1))
            if st.scaled:
                z = z * st.scale_hidden
            drop = self._dropout_mask(z, [self.specs[i].dropout for i in idx], hidden) if self.training else None
            if drop is not None:
                # Zero the dropped pre-activations in place, outside autograd: ReLU then
                # outputs 0 there, and ReLU's backward (grad * [out > 0]) already gives
                # d out/d z = mask * [z > 0], the exact dropout gradient, with no extra pass.
                # (z is not saved by the matrix product that made it, so this is safe.)
                with torch.no_grad():
                    z.mul_(drop[0])
            hid = F.relu(z)  # (B, g * hidden)
            w2, b2 = st.fc2_weight, st.fc2_bias  # (g, K, hidden), (g, K)
            if drop is not None:  # inverted dropout's 1/keep, on the small output weights
                w2 = w2 * drop[1].view(g, 1, 1)
            if g == 1:
                z = F.linear(hid, w2[0], b2[0])
                out[idx[0]] = z * st.scale[0] if st.scaled else z
                continue
            hid = hid.view(-1, g, hidden).transpose(0, 1)  # (g, B, hidden)
            z = torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2))
            out[idx] = z * st.scale.view(g, 1, 1) if st.scaled else z
        return out
