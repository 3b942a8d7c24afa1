"""Shared fixtures: tiny random-init DINOv3 backbones saved to disk, small image sets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from headlab.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> str:
    from extract.tiny import save_tiny_hf

    return save_tiny_hf(str(tmp_path_factory.mktemp("tiny_hf")), seed=0)


@pytest.fixture(scope="session")
def tiny_timm(tmp_path_factory) -> str:
    from extract.tiny import save_tiny_timm

    return save_tiny_timm(str(tmp_path_factory.mktemp("tiny_timm")), seed=0)


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> dict:
    """40 rendered digit images (6 odd formats among them) + 3 broken files; CSV splits."""
    from headlab.demo_data import build_digits_dataset

    root = str(tmp_path_factory.mktemp("digits_small"))
    csvs = build_digits_dataset(root, n_images=40, seed=1, progress=False)
    return {"root": root, **csvs}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``stage1`` in-process; returns (exit code, stdout, stderr)."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``python -m headlab`` as a user would (real exit status, real stderr)."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "headlab", *argv], capture_output=True, text=True,
                          env=env, timeout=kw.pop("timeout", 300), **kw)


PROV = {"format_version": 1, "backbone": {"library": "test", "weights_sha256": "ab" * 32},
        "preprocessing": {"preset": "baseline"}, "feature_dtype": "float16", "feature_sets": ["cls", "patch_mean"]}


def make_cache(path, feats: dict, labels, *, groups=None, prov=None, dtype="float16", classes=None) -> str:
    """Write one complete shard file holding ``feats`` (name -> (N, D)) and ``labels``."""
    import numpy as np

    from cache import ShardWriter, fingerprint_of

    prov = {**PROV, **(prov or {}), "feature_dtype": dtype, "feature_sets": list(feats)}
    n = len(labels)
    groups = [f"g{i}" for i in range(n)] if groups is None else list(groups)
    w = ShardWriter(str(path), feature_dims={k: v.shape[1] for k, v in feats.items()}, provenance=prov,
                    fingerprint=fingerprint_of(prov), feature_dtype=dtype, classes=classes,
                    plan={"plan_id": "t" * 64, "input_start": 0, "input_stop": n, "num_inputs": n})
    w.add_rows(features=feats, labels=np.asarray(labels), paths=[f"img{i}.jpg" for i in range(n)],
               sha256=[f"{i:064x}" for i in range(n)], source=["synthetic"] * n, group=groups, index=np.arange(n))
    w.finish()
    return str(path)


def blobs(n: int, d: int = 16, *, k: int = 2, sep: float = 1.5, seed: int = 0, flip: float = 0.05):
    """Gaussian classes with some label noise: ``(cls, patch_mean, labels)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centers = rng.normal(size=(k, d)) * sep
    x = centers[y] + rng.normal(size=(n, d))
    noisy = rng.random(n) < flip
    y = np.where(noisy, rng.integers(0, k, n), y)
    pm = x @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.5 * rng.normal(size=(n, d))
    return x.astype(np.float32), pm.astype(np.float32), y
