"""calibrate / sweep / certify / report through the CLI, on run dirs and plain arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

import schemas
from headlab.train import TrainConfig, run_train
from tests.conftest import blobs, make_cache, run_cli


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    n = 6000
    s = rng.normal(0, 3, n)
    y = (rng.random(n) < expit(s)).astype(np.int64)
    np.savez(d / "out.npz", labels=y, logits=np.stack([np.zeros(n), 2.5 * s], axis=1))
    np.savez(d / "probs.npz", labels=y, probs=expit(s))
    return d


def test_arrays_end_to_end(npz, tmp_path, capsys):
    out = str(tmp_path / "art")
    src = ["--logits", str(npz / "out.npz"), "--out", out]
    code, stdout, err = run_cli(["calibrate", *src, "--method", "beta"], capsys)
    assert code == 0, err
    assert "after" in stdout
    rec = schemas.read_json(f"{out}/calibration.json", "calibration")
    assert rec["metrics"]["val_calib"]["after"]["nll"] < rec["metrics"]["val_calib"]["before"]["nll"]
    code, stdout, err = run_cli(["sweep", *src, "--json"], capsys)
    assert code == 0, err
    sw = json.loads(stdout)
    assert sw["calibration"] == "beta" and sw["chosen"]["fnr_conditional"] <= 0.02
    assert open(f"{out}/sweep.csv").readline().startswith("t_conf,")
    code, stdout, err = run_cli(["certify", *src, "--fnr-definition", "system"], capsys)
    assert code == 0, err
    assert "CERTIFIED" in stdout and "conformal risk control" in stdout
    cert = schemas.read_json(f"{out}/certificate.json", "certificate")
    assert cert["ltt"]["upper_bound"] <= 0.02 and cert["policy"]["t_conf"] > 0.5
    code, stdout, err = run_cli(["certify", *src, "--rule", "two-sided", "--json"], capsys)
    assert code == 0, err
    two = json.loads(stdout)
    assert two["policy"]["t_pos"] is not None and ("t_neg" in two["policy"]) == two["ltt"]["certified"]
    code, stdout, err = run_cli(["report", *src], capsys)
    assert code == 0, err
    html = open(f"{out}/report/report.html").read()
    assert html.count("<img src='data:image/png;base64,") == 5 and "Exit policy" in html
    # probabilities work as input too
    code, _, err = run_cli(["sweep", "--logits", str(npz / "probs.npz"), "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err


def test_run_dir_end_to_end(tmp_path, capsys):
    x, pm, y = blobs(3000, seed=4, sep=1.2)
    tr = make_cache(tmp_path / "tr.h5", {"cls": x[:1500], "patch_mean": pm[:1500]}, y[:1500])
    va = make_cache(tmp_path / "va.h5", {"cls": x[1500:], "patch_mean": pm[1500:]}, y[1500:])
    run = str(tmp_path / "run")
    run_train(TrainConfig(train=[tr], val=[va], out=run, epochs=5, progress=False, knn_k=[], lr=[1e-3]))
    for argv in (["calibrate", run, "--method", "dirichlet"], ["sweep", run], ["certify", run], ["report", run]):
        code, _, err = run_cli(argv, capsys)
        assert code == 0, (argv, err)
    cert = json.load(open(f"{run}/certificate.json"))
    assert cert["source"]["run"].endswith("run") and cert["policy"]["calibration"] == "dirichlet"


def test_lab_errors(npz, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, logits=np.zeros((5, 2)))
    mismatch = tmp_path / "mm.npz"
    np.savez(mismatch, labels=np.zeros(4, int), logits=np.zeros((5, 2)))
    notprob = tmp_path / "np.npz"
    np.savez(notprob, labels=np.zeros(4, int), probs=np.array([0.1, 2.0, 0.3, 0.4]))
    three = tmp_path / "k3.npz"
    np.savez(three, labels=np.arange(300) % 3, logits=np.random.default_rng(0).normal(size=(300, 3)))
    cases = [
        (["sweep", "--logits", str(bad), "--out", str(tmp_path / "o")], "no 'labels' array"),
        (["sweep", "--logits", str(mismatch), "--out", str(tmp_path / "o")], "4 labels but 5 rows"),
        (["sweep", "--logits", str(notprob), "--out", str(tmp_path / "o")], "'probs' must be"),
        (["sweep", "--logits", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o")], "file not found"),
        (["sweep", "--logits", str(npz / "out.npz")], "--logits needs --out"),
        (["sweep"], "give either a RUN_DIR or --logits"),
        (["sweep", str(tmp_path)], "config.json: file not found"),
        (["certify", "--logits", str(three), "--out", str(tmp_path / "o")], "binary outputs"),
        (["calibrate", "--logits", str(three), "--out", str(tmp_path / "o"), "--method", "beta"], "two classes"),
        (["certify", "--logits", str(npz / "out.npz"), "--out", str(tmp_path / "o"), "--alpha", "2"], "alpha 2.0"),
    ]
    for argv, match in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and match in err and err.count("\n") == 1, (argv, err)
