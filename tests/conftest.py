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
