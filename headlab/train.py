"""`stage1 train`: heads on cached features, the baseline recipe and a grid, in one pass.

Recipe (the users' baseline): class-weighted cross-entropy with label smoothing,
AdamW (timm's optimizer factory), linear warmup + cosine decay (timm's scheduler,
stepped per update), EMA of the weights (timm's ModelEmaV3), gradient clipping per
head, early stopping on a validation metric, bf16 autocast where a GPU exists. Every
head of the grid sees the same batches; the best is chosen on ``val_select``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import schemas
from cache.errors import Stage1Error
from headlab import __version__
from headlab.data import (
    InMemoryRows,
    StreamedRows,
    check_same_fingerprint,
    columns_of,
    in_memory_bytes,
    load_matrix,
    needed_sets,
    open_labelled,
    parse_bytes,
)
from headlab.heads import HEAD_KINDS, HeadGrid, HeadSpec, eval_chunk_rows
from headlab.knn import knn_probs
from headlab.metrics import HIGHER_IS_BETTER, METRIC_NAMES, classification_metrics, softmax
from headlab.splits import split_select_calib


@dataclass
class TrainConfig:
    train: list[str]  # training cache(s): directories or shard files
    val: list[str]  # validation cache(s), labelled; split into val_select / val_calib
    out: str  # run directory to create
    features: list[str] = field(default_factory=lambda: ["cls"])  # grid: cls, patch_mean, cls+patch_mean
    head: list[str] = field(default_factory=lambda: ["mlp", "linear"])  # grid: head kinds
    lr: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])  # grid: peak learning rates
    weight_decay: list[float] = field(default_factory=lambda: [0.01])  # grid: AdamW weight decay
    dropout: list[float] = field(default_factory=lambda: [0.3])  # grid: dropout (mlp)
    hidden: int = 768  # mlp hidden width
    epochs: int = 30  # maximum epochs
    batch_size: int = 256  # rows per update
    warmup_epochs: float = 1.0  # linear warmup length
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    class_weights: str = "balanced"  # 'balanced' (inverse class frequency) or 'none'
    ema_decay: float = 0.9999  # EMA of weights (with timm's warmup); 0 disables
    grad_clip: float = 1.0  # max gradient norm per head; 0 disables
    patience: int = 5  # epochs without improvement on val_select before a head stops counting
    select_metric: str = "mcc"  # metric on val_select that picks epochs and the best head
    val_select_ratio: float = 0.5  # share of validation groups used for selection (rest: val_calib)
    seed: int = 0  # seeds initialisation, batch order and the split
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 50])  # k-NN baseline ks (empty: skip)
    knn_temperature: float = 0.07  # k-NN vote temperature
    max_memory: str | None = None  # stream training rows from HDF5 above this size (e.g. '1GB')
    device: str = "auto"  # 'auto', 'cpu', 'cuda'
    progress: bool = True  # show a progress bar

    def grid(self) -> list[HeadSpec]:
        specs = []
        for feats, kind, lr, wd, do in itertools.product(self.features, self.head, self.lr, self.weight_decay,
                                                         self.dropout):
            s = HeadSpec(kind, feats, float(lr), float(wd), float(do) if kind == "mlp" else 0.0, self.hidden)
            if s not in specs:
                specs.append(s)
        return specs

    def validate(self) -> None:
        if not self.train or not self.val:
            raise Stage1Error("train needs --train CACHE and --val CACHE")
        bad = [h for h in self.head if h not in HEAD_KINDS]
        if bad:
            raise Stage1Error(f"--head {bad}: choose from {list(HEAD_KINDS)}")
        if self.select_metric not in METRIC_NAMES:
            raise Stage1Error(f"--select-metric {self.select_metric!r}: choose from {list(METRIC_NAMES)}")
        if self.class_weights not in ("balanced", "none"):
            raise Stage1Error(f"--class-weights {self.class_weights!r}: choose balanced or none")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise Stage1Error(f"--{name.replace('_', '-')} must be >= 1")
        if any(lr <= 0 for lr in self.lr):
            raise Stage1Error(f"--lr {self.lr}: learning rates must be > 0")
        needed_sets(self.features)
        parse_bytes(self.max_memory)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("progress")
        return d


def clip_per_head(grid: HeadGrid, max_norm: float) -> None:
    """Clip each head's gradient to ``max_norm`` (L2 over that head's parameters), as
    ``clip_grad_norm_`` would per head, a few tensor operations per stack of heads."""
    grid.clip_grad_per_head_(max_norm)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise Stage1Error(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


@torch.no_grad()
def grid_logits(grid: HeadGrid, x: np.ndarray | torch.Tensor, device: torch.device,
                chunk: int | None = None) -> np.ndarray:
    """``(G, N, K)`` float32 logits of every head, in eval mode, ``chunk`` rows at a time
    (default: :func:`eval_chunk_rows` of the grid's width)."""
    grid.eval()
    chunk = chunk or eval_chunk_rows(grid.width)
    xt = torch.as_tensor(x, dtype=torch.float32)
    out = torch.empty((len(grid), len(xt), grid.num_classes), dtype=torch.float32)  # filled in place (see eval_chunk_rows)
    for s in range(0, len(xt), chunk):
        out[:, s:s + chunk] = grid(xt[s:s + chunk].to(device)).float().cpu()
    return out.numpy()


def _score(metric: str, labels: np.ndarray, logits: np.ndarray) -> float:
    v = classification_metrics(labels, softmax(logits))[metric]
    if not math.isfinite(v):
        return -math.inf
    return v if HIGHER_IS_BETTER[metric] else -v


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the grid; write the run directory; return the results summary."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.perf_counter()
    if os.path.exists(os.path.join(cfg.out, "results.json")):
        raise Stage1Error(f"{cfg.out}: already holds a finished run; choose another --out")
    device = _device(cfg.device)
    train_c = open_labelled(cfg.train, "train")
    val_c = open_labelled(cfg.val, "validation")
    check_same_fingerprint(train_c, val_c, "train", "val")
    sets = needed_sets(cfg.features)
    cols = columns_of(train_c, sets)
    columns_of(val_c, sets)
    num_classes = max(int(train_c.labels.max()), int(val_c.labels.max())) + 1
    if train_c.classes:
        num_classes = max(num_classes, len(train_c.classes))
    num_classes = max(num_classes, 2)

    sel, cal = split_select_calib(val_c.group.tolist(), ratio=cfg.val_select_ratio, seed=cfg.seed)
    val_x = load_matrix(val_c, sets)
    val_y = np.asarray(val_c.labels, dtype=np.int64)
    y_train = np.asarray(train_c.labels, dtype=np.int64)
    counts = np.bincount(y_train, minlength=num_classes)
    if (counts == 0).any():
        missing = [str(k) for k in np.flatnonzero(counts == 0)]
        raise Stage1Error(f"{train_c.describe_source()}: the train cache has no rows of class(es) {missing}; "
                          "every class needs training rows")

    budget = parse_bytes(cfg.max_memory)
    streamed = budget is not None and in_memory_bytes(train_c, sets) > budget
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_x = None if streamed else load_matrix(train_c, sets)  # read once: training, logits, k-NN
    source = (StreamedRows(train_c, sets, device, budget_bytes=budget) if streamed
              else InMemoryRows(train_x, y_train, device))

    specs = cfg.grid()
    grid = HeadGrid(specs, cols, num_classes).to(device)
    # One param group per stack of heads (its heads' lrs folded into their weights, see
    # headlab.heads._Stack); each head's own decoupled weight decay is applied by grid.decay_.
    groups = grid.param_groups()
    base_lrs = [g["lr"] for g in groups]
    # Fused AdamW (one kernel over all tensors): ~10x less optimiser time than the loop on a CPU.
    opt = create_optimizer_v2(groups, opt="adamw", lr=cfg.lr[0], weight_decay=0.0, fused=True)
    steps_per_epoch = max(1, math.ceil(len(y_train) / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(total - 1, 0))
    sched = CosineLRScheduler(opt, t_initial=total, warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                              t_in_epochs=False, lr_min=0.0)
    ema = ModelEmaV3(grid, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
    weights = None
    if cfg.class_weights == "balanced":
        weights = torch.as_tensor(len(y_train) / (num_classes * counts), dtype=torch.float32, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    os.makedirs(os.path.join(cfg.out, "heads"), exist_ok=True)
    log_path = os.path.join(cfg.out, "log.jsonl")
    G = len(specs)
    best = [-math.inf] * G
    best_epoch = [-1] * G
    best_state: list[dict[str, torch.Tensor] | None] = [None] * G
    stale = [0] * G
    step = 0
    bar = tqdm(range(cfg.epochs), desc=f"train {G} head(s)", unit="epoch", disable=not cfg.progress)
    epochs_run = 0
    with open(log_path, "w") as log:
        for epoch in bar:
            grid.train()
            t0 = time.perf_counter()
            loss_sum, rows = 0.0, 0
            for xb, yb in source.batches(gen, cfg.batch_size):
                with autocast:
                    logits = grid(xb)  # (G, B, K)
                loss = F.cross_entropy(logits.float().reshape(-1, num_classes), yb.repeat(G), weight=weights,
                                       label_smoothing=cfg.label_smoothing) * G
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    clip_per_head(grid, cfg.grad_clip)
                grid.decay_([g["lr"] for g in opt.param_groups])
                opt.step()
                step += 1
                sched.step_update(step)
                if ema is not None:
                    ema.update(grid, step=step)
                loss_sum += float(loss.detach()) * len(yb) / G
                rows += len(yb)
            train_secs = time.perf_counter() - t0
            evaluated = ema.module if ema is not None else grid
            vl = grid_logits(evaluated, val_x[sel], device)
            scores = [_score(cfg.select_metric, val_y[sel], vl[g]) for g in range(G)]
            for g in range(G):
                if scores[g] > best[g]:
                    best[g], best_epoch[g], stale[g] = scores[g], epoch, 0
                    best_state[g] = {k: v.cpu().clone() for k, v in evaluated.head_state(g).items()}
                else:
                    stale[g] += 1
            sign = 1 if HIGHER_IS_BETTER[cfg.select_metric] else -1
            log.write(json.dumps({"epoch": epoch, "train_loss": loss_sum / max(rows, 1), "seconds": train_secs,
                                  "rows": rows, "lr_scale": opt.param_groups[0]["lr"] / base_lrs[0],
                                  f"val_select_{cfg.select_metric}": [sign * s for s in scores]}) + "\n")
            log.flush()
            epochs_run = epoch + 1
            bar.set_postfix({cfg.select_metric: f"{sign * max(best):.4f}", "s/epoch": f"{train_secs:.2f}"})
            if all(s >= cfg.patience for s in stale):
                break
    bar.close()

    final = copy.deepcopy(grid).cpu()
    for g in range(G):
        if best_state[g] is not None:
            final.load_head_state(g, best_state[g])
    return _write_run(cfg, final, specs, best, best_epoch, sel, cal, train_c, val_c, sets, cols, num_classes,
                      train_x, val_x, val_y, epochs_run, streamed, time.perf_counter() - t_start)


def _write_run(cfg, final, specs, best, best_epoch, sel, cal, train_c, val_c, sets, cols, num_classes,
               train_x, val_x, val_y, epochs_run, streamed, seconds) -> dict[str, Any]:
    from safetensors.torch import save_file

    cpu = torch.device("cpu")
    vl_sel = grid_logits(final, val_x[sel], cpu)
    vl_cal = grid_logits(final, val_x[cal], cpu)
    table = []
    for g, spec in enumerate(specs):
        m_sel = classification_metrics(val_y[sel], softmax(vl_sel[g]))
        table.append({"head": g, "name": spec.name, **spec.to_dict(), "best_epoch": best_epoch[g],
                      **{f"val_select_{k}": m_sel[k] for k in METRIC_NAMES}})
        save_file({k: v.contiguous() for k, v in final.head_state(g).items()},
                  os.path.join(cfg.out, "heads", f"head-{g:03d}.safetensors"),
                  metadata={"spec": json.dumps(spec.to_dict())})
    chosen = int(np.argmax(best))
    head = final.head(chosen)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(cfg.out, "head.safetensors"),
              metadata={"spec": json.dumps(specs[chosen].to_dict())})

    lo, hi = final.slices[chosen]
    # In-memory runs also store train logits (streamed ones may not fit).
    train_logits = head.logits(train_x[:, lo:hi]) if train_x is not None else None
    arrays = {"val_select_logits": vl_sel[chosen], "val_select_labels": val_y[sel], "val_select_rows": sel,
              "val_calib_logits": vl_cal[chosen], "val_calib_labels": val_y[cal], "val_calib_rows": cal}
    if train_logits is not None:
        arrays.update(train_logits=train_logits, train_labels=np.asarray(train_c.labels),
                      train_rows=np.arange(len(train_c)))
    np.savez_compressed(os.path.join(cfg.out, "logits.npz"), **arrays)

    knn = []
    if cfg.knn_k and train_x is not None:
        for feats in dict.fromkeys(cfg.features):
            a, b = final.feature_range(feats)
            probs = knn_probs(train_x[:, a:b], np.asarray(train_c.labels), val_x[sel][:, a:b], ks=cfg.knn_k,
                              temperature=cfg.knn_temperature, num_classes=num_classes)
            for k, p in probs.items():
                m = classification_metrics(val_y[sel], p)
                knn.append({"features": feats, "k": k, **{f"val_select_{n}": m[n] for n in METRIC_NAMES}})

    splits = {"stage1_version": __version__, "seed": cfg.seed, "ratio": cfg.val_select_ratio,
              "key": "group", "val_fingerprint": val_c.fingerprint, "val_rows": len(val_c),
              "val_select": sel.tolist(), "val_calib": cal.tolist(),
              "counts": {"val_select": _counts(val_y[sel], num_classes), "val_calib": _counts(val_y[cal], num_classes)}}
    schemas.write_json(splits, os.path.join(cfg.out, "splits.json"), "splits")
    config = {"stage1_version": __version__, "command": "train", "config": cfg.to_dict(),
              "cache_fingerprint": train_c.fingerprint, "provenance": train_c.provenance,
              "classes": train_c.classes, "num_classes": num_classes, "feature_sets": sets,
              "columns": {k: list(v) for k, v in cols.items()}}
    schemas.write_json(config, os.path.join(cfg.out, "config.json"), "train_config")
    results = {"stage1_version": __version__, "select_metric": cfg.select_metric, "chosen": chosen,
               "chosen_name": specs[chosen].name, "chosen_spec": specs[chosen].to_dict(),
               "chosen_val_select": {k: table[chosen][f"val_select_{k}"] for k in METRIC_NAMES},
               "heads": table, "knn": knn, "epochs_run": epochs_run, "streamed": streamed,
               "rows": {"train": len(train_c), "val_select": len(sel), "val_calib": len(cal)},
               "num_classes": num_classes, "seconds": round(seconds, 3)}
    schemas.write_json(_finite(results), os.path.join(cfg.out, "results.json"), "train_results")
    with open(os.path.join(cfg.out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    return results


def _counts(y: np.ndarray, k: int) -> dict[str, int]:
    return {str(i): int(c) for i, c in enumerate(np.bincount(y, minlength=k))}


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict and schema-checkable."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def format_results(res: dict[str, Any], top: int = 12) -> str:
    m = res["select_metric"]
    key = f"val_select_{m}"
    rows = sorted(res["heads"], key=lambda r: -(r[key] if r[key] is not None else -math.inf)
                  if HIGHER_IS_BETTER[m] else (r[key] if r[key] is not None else math.inf))
    lines = [f"{'head':<46} {'epoch':>5} {'acc':>7} {'mcc':>7} {'auroc':>7} {'nll':>7}"]
    for r in rows[:top]:
        lines.append(f"{r['name']:<46} {r['best_epoch']:>5} {_f(r['val_select_accuracy'])} {_f(r['val_select_mcc'])} "
                     f"{_f(r['val_select_auroc'])} {_f(r['val_select_nll'])}" + ("  <- chosen" if r["head"] == res["chosen"] else ""))
    for r in res["knn"]:
        lines.append(f"{'knn-' + r['features'] + '-k' + str(r['k']):<46} {'-':>5} {_f(r['val_select_accuracy'])} "
                     f"{_f(r['val_select_mcc'])} {_f(r['val_select_auroc'])} {_f(r['val_select_nll'])}")
    lines.append(f"chosen on val_select by {m}: {res['chosen_name']} "
                 f"({res['rows']['train']} train rows, {res['epochs_run']} epochs, {res['seconds']:.1f} s)")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return f"{v:7.4f}" if v is not None and math.isfinite(v) else f"{'-':>7}"
