"""`stage1 demo`: the whole pipeline on images rendered from scikit-learn's digits.

Nothing is downloaded. Unless ``--backbone`` names real weights, the backbone is a
tiny random-init DINOv3 saved locally: its features are untrained, so the figures
show the machinery working, not what DINOv3 can do.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cache.errors import Stage1Error
from cache.tools import cache_info, format_info, verify_cache
from headlab.demo_data import build_digits_dataset

STEPS = 11


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(out: str = "stage1-demo", *, n_images: int = 2000, backbone: str | None = None,
             weights: str | None = None, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the demo data, extract train/val/test caches, inspect and verify them.

    Re-running reuses the images and resumes the caches (finished shards are kept).
    Returns where each artifact is and the headline figures.
    """
    from extract.run import ExtractConfig, run_extract

    t0 = time.perf_counter()
    data = os.path.join(out, "data")
    _say(f"[1/{STEPS}] demo images: {n_images} digits rendered as JPEG/PNG files under {data}")
    csvs = build_digits_dataset(data, n_images=n_images, progress=progress)
    if backbone is None:
        from extract.tiny import save_tiny_hf

        bdir = os.path.join(out, "backbone-tiny-random")
        if not os.path.exists(os.path.join(bdir, "config.json")):
            save_tiny_hf(bdir, seed=0)
        backbone = f"hf:{bdir}"
        _say(f"      backbone: tiny random-init DINOv3 ({bdir}); its features are UNTRAINED, "
             "pass --backbone for real weights")
    caches = {}
    summaries = {}
    _say(f"[2/{STEPS}] extract: one pass of the frozen backbone per split into HDF5 caches")
    for split, csv in csvs.items():
        cache_dir = os.path.join(out, "cache", split)
        cfg = ExtractConfig(images=[data], labels=[csv], backbone=backbone, weights=weights, out=cache_dir,
                            shard_size=512, progress=progress,
                            **({"workers": workers} if workers is not None else {}))
        s = run_extract(cfg)
        rate = f", {s['images_per_s']:.0f} img/s" if s.get("images_per_s") else ""
        _say(f"      {split:5s} {s['inputs'] - s['failures']:5d} rows, {s['failures']} failed to decode, "
             f"{s['shards_written']} shard(s) written / {s['shards_skipped']} reused{rate}")
        caches[split], summaries[split] = cache_dir, s
    _say(f"[3/{STEPS}] cache info + verify")
    _say("\n".join("      " + line for line in format_info(cache_info(caches["train"])).splitlines()))
    for split, path in caches.items():
        problems = verify_cache(path)
        if problems:
            raise Stage1Error(f"demo cache {path} failed verification: {problems[0]}")
        _say(f"      verify {split}: OK")

    from headlab.evaluate import evaluate_run
    from headlab.lab import load_outputs, run_calibrate, run_certify, run_sweep
    from headlab.report import make_report
    from headlab.train import TrainConfig, format_results, run_train

    run_dir = os.path.join(out, "run")
    _say(f"[4/{STEPS}] train: a grid of heads on the cached features (no images decoded)")
    if os.path.exists(os.path.join(run_dir, "results.json")):
        import shutil

        shutil.rmtree(run_dir)
    res = run_train(TrainConfig(train=[caches["train"]], val=[caches["val"]], out=run_dir, epochs=20,
                                features=["cls", "cls+patch_mean"], lr=[3e-4, 1e-3], progress=progress))
    _say("\n".join("      " + line for line in format_results(res).splitlines()))
    ev = evaluate_run(run_dir, [caches["test"]])
    _say(f"      test: accuracy {ev['accuracy']:.4f}, MCC {ev['mcc']:.4f}, AUROC {ev['auroc']:.4f} ({ev['n']} rows)")

    o = load_outputs(run_dir)
    _say(f"[5/{STEPS}] calibrate (temperature) on val_select")
    cal = run_calibrate(o, method="temperature")
    b, a = cal["metrics"]["val_calib"]["before"], cal["metrics"]["val_calib"]["after"]
    _say(f"      val_calib NLL {b['nll']:.4f} -> {a['nll']:.4f}, ECE {b['ece']:.4f} -> {a['ece']:.4f} "
         f"(T = {cal['calibrator']['params']['temperature']:.3f})")
    _say(f"[6/{STEPS}] sweep exit thresholds on val_select (target FNR 0.02)")
    sw = run_sweep(o, target=0.02)
    c = sw["chosen"]
    _say(f"      {sw['thresholds']} achievable thresholds; " + (
        f"max coverage under the target: t_conf = {c['t_conf']:.4f}, coverage {c['coverage']:.3f}" if c else
        "no threshold meets the target on val_select"))
    _say(f"[7/{STEPS}] certify on val_calib (Learn-then-Test, alpha 0.02, delta 0.1)")
    cert = run_certify(o, alpha=0.02, delta=0.1)
    ltt = cert["ltt"]
    _say("      " + (f"CERTIFIED t_conf = {cert['policy']['t_conf']:.4f}: upper bound {ltt['upper_bound']:.4f}, "
                     f"coverage {ltt['coverage']:.3f}" if ltt["certified"] else ltt["reason"]))
    _say(f"[8/{STEPS}] report")
    rep = make_report(o)
    _say(f"      {rep['html']} ({len(rep['plots'])} plots)")

    import shutil

    from headlab.bundle import export_bundle
    from headlab.predict import Predictor, write_predictions
    from headlab.recalibrate import recalibrate

    bundle, rebundle = os.path.join(out, "bundle"), os.path.join(out, "bundle-recalibrated")
    for d in (bundle, rebundle):
        if os.path.exists(d):
            shutil.rmtree(d)
    _say(f"[9/{STEPS}] export the deployment bundle")
    man = export_bundle(run_dir, bundle)
    _say(f"      {bundle}: {len(man['files'])} files, sha256 of each in manifest.json; exit policy "
         + ("certified" if man["policy"]["certified"] else "not certified, so every image defers to stage 2"))
    _say(f"[10/{STEPS}] predict on raw test images (backbone -> head -> calibrator -> exit policy)")
    test_paths = [os.path.join(data, line.split(",")[0]) for line in open(csvs["test"]) if line.strip()]
    recs = Predictor(bundle, natix=True, batch_size=64).predict(test_paths)
    pred_path = os.path.join(out, "predictions.jsonl")
    write_predictions(recs, pred_path)
    ok = [r for r in recs if "error" not in r]
    _say(f"      {len(recs)} images -> {pred_path}: {sum(r['action'] == 'exit' for r in ok)} exit, "
         f"{sum(r['action'] == 'defer' for r in ok)} defer (probabilities NATIX-remapped)")
    _say(f"[11/{STEPS}] re-calibrate the bundle on a fresh labelled batch (the test cache), no retraining")
    rc = recalibrate(bundle, [caches["test"]], rebundle)
    ks = rc["drift"]["per_class"]
    _say(f"      {rebundle}: drift KS negatives {ks['0']['ks']:.3f}, positives {ks['1']['ks']:.3f}; "
         f"report {rebundle}/drift.html")

    secs = time.perf_counter() - t0
    _say(f"\ndemo finished in {secs:.0f} s. Artifacts:\n  images + labels  {data}\n"
         + "".join(f"  cache {k:10s} {v}\n" for k, v in caches.items())
         + f"  run dir          {run_dir} (heads, logits, calibration.json, sweep.csv, certificate.json)\n"
         + f"  report           {rep['html']}\n"
         + f"  bundle           {bundle}\n  predictions      {pred_path}\n  re-calibrated    {rebundle}\n")
    return {"out": out, "data": data, "csv": csvs, "caches": caches, "backbone": backbone,
            "extract": summaries, "run": run_dir, "train": {"chosen": res["chosen_name"]}, "test": ev,
            "certified": ltt["certified"], "report": rep["html"], "bundle": bundle, "predictions": pred_path,
            "recalibrated": rebundle, "seconds": round(secs, 1)}
