"""Reading a run directory written by `stage1 train`: its config, splits, heads and logits."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import schemas
from cache.errors import Stage1Error
from cache.format import short
from headlab.heads import Head, HeadSpec


@dataclass
class Run:
    path: str
    config: dict[str, Any]  # config.json
    results: dict[str, Any]  # results.json
    splits: dict[str, Any]  # splits.json

    @property
    def spec(self) -> HeadSpec:
        return HeadSpec(**self.results["chosen_spec"])

    @property
    def fingerprint(self) -> str:
        return self.config["cache_fingerprint"]

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def feature_sets(self) -> list[str]:
        return self.spec.features.split("+")

    def load_head(self) -> Head:
        """The chosen head with its weights, in eval mode."""
        from safetensors.torch import load_file

        path = os.path.join(self.path, "head.safetensors")
        try:
            state = load_file(path)
        except FileNotFoundError:
            raise Stage1Error(f"{path}: missing; the run directory is incomplete, re-run `stage1 train`") from None
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise Stage1Error(f"{path}: cannot be read as safetensors ({e}); re-run `stage1 train`") from None
        s = self.spec
        in_dim = sum(b - a for a, b in (self.config["columns"][f] for f in self.feature_sets()))
        head = Head(in_dim, self.num_classes, kind=s.kind, hidden=s.hidden, dropout=s.dropout)
        try:
            head.load_state_dict(state)
        except RuntimeError as e:
            raise Stage1Error(f"{path}: weights do not fit the head in results.json ({str(e)[:120]})") from None
        return head.eval()

    def logits(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.path, "logits.npz")
        if not os.path.exists(path):
            raise Stage1Error(f"{path}: missing; the run directory is incomplete, re-run `stage1 train`")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def load_run(path: str) -> Run:
    if not os.path.isdir(path):
        raise Stage1Error(f"{path}: not a run directory (written by `stage1 train --out`)")
    cfg = schemas.read_json(os.path.join(path, "config.json"), "train_config")
    res = schemas.read_json(os.path.join(path, "results.json"), "train_results")
    spl = schemas.read_json(os.path.join(path, "splits.json"), "splits")
    return Run(path, cfg, res, spl)


@torch.no_grad()
def head_logits(run: Run, cache) -> np.ndarray:
    """Logits ``(N, K)`` of the run's chosen head on every row of ``cache``."""
    if cache.fingerprint != run.fingerprint:
        raise Stage1Error(
            f"{cache.describe_source()}: cache fingerprint {short(cache.fingerprint)} differs from the run's "
            f"{short(run.fingerprint)} ({run.path}); extract it with the run's backbone and preprocessing")
    from headlab.data import load_matrix

    for s in run.feature_sets():
        if s not in cache.feature_sets:
            raise Stage1Error(f"{cache.describe_source()}: feature set {s!r} is missing; the head needs "
                              f"{run.feature_sets()}")
    head = run.load_head()
    x = load_matrix(cache, run.feature_sets())
    return head.logits(x)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=float)
