"""Acceptance: >= 2,000 generated image files, `stage1 extract` + `stage1 cache verify` on CPU,
and a kill-and-resume run identical to an uninterrupted one."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cache import open_cache
from tests.conftest import run_cli
from tests.test_extract import kill_and_resume


@pytest.mark.slow
def test_two_thousand_images_extract_verify_kill_resume(tmp_path_factory, tiny_hf, capsys):
    from headlab.demo_data import build_digits_dataset

    root = str(tmp_path_factory.mktemp("digits2k"))
    build_digits_dataset(root, n_images=2000, seed=3, progress=False)
    all_csv = f"{root}/all.csv"
    with open(all_csv, "w") as fh:
        for split in ("train", "val", "test"):
            fh.write(open(f"{root}/{split}.csv").read())
    out = tmp_path_factory.mktemp("acc")
    args = ["extract", "--images", root, "--labels", all_csv, "--backbone", tiny_hf, "--batch-size", "32",
            "--shard-size", "256", "--quiet"]
    code, stdout, err = run_cli([*args, "--out", str(out / "ref")], capsys)
    assert code == 0, err
    assert "failures: 3 of 2003 inputs" in stdout
    assert run_cli(["cache", "verify", str(out / "ref")], capsys)[0] == 0

    cmd = [sys.executable, "-m", "headlab", *args, "--out", str(out / "killed")]
    kill_and_resume(cmd, out / "killed", after_shards=3)
    assert run_cli(["cache", "verify", str(out / "killed")], capsys)[0] == 0
    with open_cache(str(out / "ref")) as a, open_cache(str(out / "killed")) as b:
        assert len(a) == len(b) == 2000
        for name in ("cls", "patch_mean"):
            assert a.features(name, dtype=np.float16).tobytes() == b.features(name, dtype=np.float16).tobytes()
        assert a.sha256.tolist() == b.sha256.tolist() and a.failures == b.failures
