"""`stage1 predict`: raw images -> backbone -> head -> calibrator -> exit policy.

:class:`Predictor` is the same thing as a Python object for services. The backbone
is loaded from the bundle's spec (or ``backbone=`` pointing at local weights) and must
be the exact model the bundle was trained on (weights sha256 checked); preprocessing
follows the bundle's recipe.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from cache.errors import Stage1Error
from headlab.bundle import Bundle, load_bundle, natix_remap


def _preprocessing(recipe: dict[str, Any]):
    from extract.preprocess import Preprocessing

    return Preprocessing(preset=recipe["preset"], resize=recipe["resize"], crop=recipe["crop"],
                         interpolation=recipe["interpolation"], mean=tuple(recipe["mean"]), std=tuple(recipe["std"]),
                         decoder=recipe["decoder"], exif_transpose=recipe["exif_transpose"])


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files and directories (walked recursively, image extensions) -> file list."""
    from extract.sources import _walk_images

    out = []
    for p in inputs:
        if os.path.isdir(p):
            out += _walk_images(p)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise Stage1Error(f"{p}: no such image file or directory")
    if not out:
        raise Stage1Error(f"no image files found in {' '.join(inputs)}")
    return out


class Predictor:
    """Calibrated, policy-aware predictions from raw images.

    Parameters
    ----------
    bundle : str or Bundle
        Bundle directory written by ``stage1 export`` (verified on load).
    backbone : str, optional
        Backbone spec to load instead of the bundle's (e.g. ``hf:/models/dinov3-vitl16``);
        its weights must hash to the bundle's ``weights_sha256``.
    natix : bool
        Remap probabilities so that rounding at 0.5 gives the bundle's decision.
    """

    def __init__(self, bundle: str | Bundle, *, backbone: str | None = None, weights: str | None = None,
                 device: str = "auto", batch_size: int = 32, workers: int = 0, natix: bool = False) -> None:
        from extract.backbone import load_backbone
        from extract.run import resolve_device

        self.bundle = load_bundle(bundle) if isinstance(bundle, str) else bundle
        m = self.bundle.manifest
        spec = backbone or m["backbone"].get("spec")
        if not spec:
            raise Stage1Error(f"{self.bundle.path}: the bundle names no backbone spec; pass --backbone")
        self.device = resolve_device(device)
        bb = load_backbone(spec, weights=weights or None)
        if bb.weights_sha256 != m["backbone"]["weights_sha256"]:
            raise Stage1Error(f"backbone {spec}: weights sha256 {bb.weights_sha256[:12]} differ from the bundle's "
                              f"{m['backbone']['weights_sha256'][:12]}; point --backbone at the weights the bundle "
                              "was trained on")
        self.backbone = bb.to(self.device)
        self.recipe = _preprocessing(m["preprocessing"])
        self.batch_size, self.workers, self.natix = batch_size, workers, natix

    @torch.inference_mode()
    def features(self, x: torch.Tensor) -> np.ndarray:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        with autocast:
            f = self.backbone(x.to(self.device))
        return np.concatenate([f[s].float().cpu().numpy() for s in self.bundle.feature_sets], axis=1)

    def _records(self, paths: list[str], feats: np.ndarray) -> list[dict[str, Any]]:
        out = self.bundle.decide(self.bundle.logits(feats))
        tau = self.bundle.decision_threshold
        recs = []
        for i, path in enumerate(paths):
            p = float(out["prob"][i])
            rec = {"path": path, "prob": float(natix_remap(p, tau)) if self.natix else p,
                   "decision": int(out["decision"][i]), "action": "exit" if out["exit"][i] else "defer"}
            if self.natix:
                rec["prob_calibrated"] = p
            recs.append(rec)
        return recs

    def predict(self, paths: Iterable[str]) -> list[dict[str, Any]]:
        """One record per image: ``path, prob, decision, action`` (or ``path, error``), in input order."""
        from extract.run import _collate, _ImageDataset, _worker_init
        from extract.sources import Item

        paths = list(paths)
        items = [Item(p, p, -1, "", "") for p in paths]
        batches = [list(range(s, min(s + self.batch_size, len(items)))) for s in range(0, len(items), self.batch_size)]
        loader = torch.utils.data.DataLoader(_ImageDataset(items, self.recipe), batch_sampler=batches,
                                             num_workers=self.workers, collate_fn=_collate, worker_init_fn=_worker_init)
        results: dict[int, dict[str, Any]] = {}
        for idx, x, _, failed in loader:
            for i, reason in failed:
                results[i] = {"path": paths[i], "error": reason}
            if idx:
                for i, rec in zip(idx, self._records([paths[i] for i in idx], self.features(x)), strict=True):
                    results[i] = rec
        return [results[i] for i in range(len(paths))]


def write_predictions(records: list[dict[str, Any]], out: str) -> None:
    """JSON lines (``.jsonl``) or CSV (``.csv``), written atomically."""
    tmp = out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".csv"):
        fields = ["path", "prob", "decision", "action", "prob_calibrated", "error"]
        fields = [f for f in fields if any(f in r for r in records)]
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(records)
    elif out.endswith(".jsonl"):
        with open(tmp, "w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
    else:
        raise Stage1Error(f"--out {out!r}: use a .jsonl or .csv file name")
    os.replace(tmp, out)
