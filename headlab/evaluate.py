"""`stage1 evaluate`: metrics of a run's chosen head on any labelled cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cache.errors import Stage1Error
from headlab.data import open_labelled
from headlab.metrics import classification_metrics, softmax
from headlab.rundir import head_logits, load_run


def evaluate_run(run_dir: str, cache_paths: Sequence[str]) -> dict[str, Any]:
    """Accuracy, MCC, AUROC, NLL, Brier, ECE/ACE of the chosen head on ``cache_paths``."""
    run = load_run(run_dir)
    with open_labelled(cache_paths, "evaluation") as c:
        logits = head_logits(run, c)
        labels = c.labels
        if labels.max() >= run.num_classes:
            raise Stage1Error(f"{c.describe_source()}: label {int(labels.max())} is outside the run's "
                              f"{run.num_classes} classes")
        return {"run": run_dir, "head": run.results["chosen_name"], "cache": list(cache_paths),
                **classification_metrics(labels, softmax(logits))}
