"""Bundles: export, verification, predict on raw images, NATIX remap, re-calibration."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from cache import Stage1Error, open_cache
from extract.run import ExtractConfig, run_extract
from headlab.bundle import export_bundle, load_bundle, natix_remap
from headlab.lab import load_outputs, run_calibrate, run_certify, run_sweep
from headlab.predict import Predictor
from headlab.recalibrate import recalibrate
from headlab.train import TrainConfig, run_train
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, digits_small, tiny_hf):
    """Extract the small digits set, train, calibrate, certify, export."""
    d = tmp_path_factory.mktemp("bundle")
    caches = {}
    for split in ("train", "val"):
        caches[split] = str(d / split)
        run_extract(ExtractConfig(images=[digits_small["root"]], labels=[digits_small[split]], backbone=tiny_hf,
                                  out=caches[split], workers=0, progress=False, max_failures="20%"))
    run = str(d / "run")
    run_train(TrainConfig(train=[caches["train"]], val=[caches["val"]], out=run, epochs=3, progress=False,
                          knn_k=[], lr=[1e-3], features=["cls+patch_mean"], val_select_ratio=0.5))
    o = load_outputs(run)
    run_calibrate(o, method="temperature")
    run_sweep(o)
    run_certify(o, alpha=0.3, delta=0.2)  # tiny data: a loose target so that something can exit
    bundle = str(d / "bundle")
    export_bundle(run, bundle)
    return {"dir": d, "caches": caches, "run": run, "bundle": bundle, "spec": tiny_hf}


def test_bundle_manifest_and_hashes(pipeline):
    b = load_bundle(pipeline["bundle"])
    m = b.manifest
    assert set(m["files"]) == {"head.safetensors", "calibrator.json", "policy.json", "reference.npz"}
    assert m["backbone"]["spec"] == pipeline["spec"] and m["head"]["feature_sets"] == ["cls", "patch_mean"]
    assert m["cache"]["fingerprint"] == open_cache(pipeline["caches"]["val"]).fingerprint
    assert not any(f.endswith(".pkl") or f.endswith(".pt") for f in os.listdir(pipeline["bundle"]))


def test_tampered_and_incomplete_bundles_refused(pipeline, tmp_path):
    t = str(tmp_path / "t")
    shutil.copytree(pipeline["bundle"], t)
    with open(os.path.join(t, "calibrator.json"), "a") as fh:
        fh.write(" ")
    with pytest.raises(Stage1Error, match="calibrator.json: sha256 does not match the manifest"):
        load_bundle(t)
    shutil.rmtree(t)
    shutil.copytree(pipeline["bundle"], t)
    os.remove(os.path.join(t, "head.safetensors"))
    with pytest.raises(Stage1Error, match="head.safetensors: missing from the bundle"):
        load_bundle(t)
    with open(os.path.join(t, "manifest.json"), "w") as fh:
        json.dump({"bundle_format_version": 1}, fh)
    with pytest.raises(Stage1Error, match="does not match the bundle_manifest schema"):
        load_bundle(t)
    with pytest.raises(Stage1Error, match="exists and is not empty"):
        export_bundle(pipeline["run"], pipeline["bundle"])


def test_predict_on_raw_images_equals_head_on_cache(pipeline, digits_small):
    b = load_bundle(pipeline["bundle"])
    with open_cache(pipeline["caches"]["val"]) as c:
        x = np.concatenate([c.features("cls"), c.features("patch_mean")], axis=1)
        want = b.decide(b.logits(x))
        paths = [os.path.join(digits_small["root"], p) for p in c.paths]
    pred = Predictor(b, batch_size=7)
    recs = pred.predict([*paths, os.path.join(digits_small["root"], "images", "broken_empty.png")])
    assert recs[-1]["error"] == "empty file"
    got = np.array([r["prob"] for r in recs[:-1]])
    np.testing.assert_allclose(got, want["prob"], atol=2e-3)
    agree = np.mean([r["decision"] for r in recs[:-1]] == want["decision"])
    assert agree >= 0.98
    assert [r["path"] for r in recs[:-1]] == paths


def test_predict_cli_natix_and_wrong_backbone(pipeline, digits_small, tmp_path, capsys):
    out = str(tmp_path / "pred.jsonl")
    img_dir = os.path.join(digits_small["root"], "images")
    code, stdout, err = run_cli(["predict", pipeline["bundle"], img_dir, "--out", out, "--natix"], capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in open(out)]
    assert sum("error" in r for r in recs) == 3
    tau = load_bundle(pipeline["bundle"]).decision_threshold
    for r in recs:
        if "error" not in r:
            assert (r["prob"] >= 0.5) == (r["prob_calibrated"] >= tau) == bool(r["decision"])
    csv_out = str(tmp_path / "pred.csv")
    assert run_cli(["predict", pipeline["bundle"], img_dir, "--out", csv_out], capsys)[0] == 0
    assert open(csv_out).readline().startswith("path,prob,decision,action")
    from extract.tiny import save_tiny_hf

    other = save_tiny_hf(str(tmp_path / "other"), seed=5)
    code, _, err = run_cli(["predict", pipeline["bundle"], img_dir, "--out", out, "--backbone", other], capsys)
    assert code == 2 and "differ from the bundle's" in err


def test_natix_remap_properties():
    p = np.linspace(0, 1, 1001)
    for tau in (0.2, 0.5, 0.83):
        q = natix_remap(p, tau)
        assert np.all(np.diff(q) >= 0) and q[0] == 0 and q[-1] == 1
        assert np.array_equal(q >= 0.5, p >= tau)


def test_recalibrate(pipeline, tmp_path, capsys):
    out = str(tmp_path / "re")
    code, stdout, err = run_cli(["recalibrate", pipeline["bundle"], "--cache", pipeline["caches"]["val"],
                                 "--out", out], capsys)
    assert code == 0, err
    b = load_bundle(out)
    assert b.manifest["parent"]["path"] == os.path.abspath(pipeline["bundle"])
    d = b.manifest["drift"]
    assert set(d["per_class"]) == {"0", "1"} and 0 <= d["per_class"]["1"]["ks"] <= 1
    assert os.path.exists(os.path.join(out, "drift.html")) and "drift.html" in b.manifest["files"]
    # the same data as the reference: almost no shift
    assert d["label_prior"]["reference"] == pytest.approx(d["label_prior"]["new"])
    # a cache from another backbone is refused
    from extract.tiny import save_tiny_hf

    spec = save_tiny_hf(str(tmp_path / "other"), seed=9)
    other_cache = str(tmp_path / "oc")
    cfg = json.load(open(os.path.join(pipeline["caches"]["val"], "extract.json")))["config"]
    run_extract(ExtractConfig(images=cfg["images"], labels=cfg["labels"], backbone=spec, out=other_cache,
                              workers=0, progress=False, max_failures="20%"))
    with pytest.raises(Stage1Error, match="does not match the bundle's"):
        recalibrate(pipeline["bundle"], [other_cache], str(tmp_path / "re2"))
