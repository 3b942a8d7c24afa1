"""The ``stage1`` command line: a thin layer that parses flags and calls the library.

Every subcommand maps to a function a notebook can call (``run_extract``,
``cache_info``, ...). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cache.errors import Stage1Error
from headlab import __version__
from headlab.config import apply_config


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _require(args: argparse.Namespace, command: str, *dests: str) -> None:
    """Options that may come from the command line or --config, but must come from one."""
    missing = [f"--{d.replace('_', '-')}" for d in dests if not getattr(args, d)]
    if missing:
        raise Stage1Error(f"{command} needs {', '.join(missing)} (as flags or keys in --config)")


# ---------------------------------------------------------------------------------------
# handlers
def _cmd_extract(args: argparse.Namespace) -> int:
    from extract.run import ExtractConfig, run_extract

    _require(args, "extract", "images", "out", "backbone")
    cfg = ExtractConfig(images=args.images, labels=args.labels or [], backbone=args.backbone, out=args.out,
                        weights=args.weights, preprocess=args.preprocess, image_size=args.image_size,
                        feature_sets=args.feature_sets, dtype=args.dtype, batch_size=args.batch_size,
                        forward_batch=args.forward_batch, shard_size=args.shard_size, device=args.device,
                        max_failures=str(args.max_failures), decoder=args.decoder, compile=args.compile,
                        cuda_graphs=args.cuda_graphs,
                        progress=not args.quiet, **({"workers": args.workers} if args.workers is not None else {}))
    summary = run_extract(cfg)
    if args.json:
        _print_json(summary)
    else:
        print(format_extract_summary(summary))
    if summary["failures_exceeded"]:
        print(f"stage1: error: {summary['failures']} images failed to decode, more than --max-failures "
              f"{args.max_failures} ({summary['max_failures']}); see `stage1 cache info {args.out}`", file=sys.stderr)
        return 1
    return 0


def format_extract_summary(s: dict) -> str:
    rate = f", {s['images_per_s']:.0f} img/s" if s.get("images_per_s") else ""
    lines = [f"extracted {s['rows_written']} rows into {s['out']} ({s['shards_written']} shard(s) written, "
             f"{s['shards_skipped']} already complete; {s['seconds']:.1f} s{rate} on {s['device']})",
             f"failures: {s['failures']} of {s['inputs']} inputs (limit {s['max_failures']})"]
    for reason, count in sorted(s["failure_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {count:6d}  {reason}")
    lines.append(f"fingerprint {s['fingerprint'][:12]}")
    return "\n".join(lines)


def _cmd_cache_info(args: argparse.Namespace) -> int:
    import schemas
    from cache.tools import cache_info, format_info

    info = cache_info(args.paths)
    schemas.validate(info, "cache_info", where="cache info")
    if args.json:
        _print_json(info)
    else:
        print(format_info(info))
    return 0


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    from cache.tools import verify_cache

    problems = verify_cache(args.paths)
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    print(f"OK: {' '.join(args.paths)}")
    return 0


def _cmd_cache_merge(args: argparse.Namespace) -> int:
    from cache.tools import merge_caches

    res = merge_caches(args.paths, args.out)
    if args.json:
        _print_json(res)
    else:
        print(f"merged {res['shards_merged']} shard(s), {res['rows']} rows -> {res['out']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from headlab.train import TrainConfig, format_results, run_train

    _require(args, "train", "train", "val", "out")
    keys = ("features", "head", "lr", "weight_decay", "dropout", "hidden", "epochs", "batch_size", "warmup_epochs",
            "label_smoothing", "class_weights", "ema_decay", "grad_clip", "patience", "select_metric",
            "val_select_ratio", "seed", "knn_k", "knn_temperature", "max_memory", "device")
    cfg = TrainConfig(train=args.train, val=args.val, out=args.out, progress=not args.quiet,
                      **{k: getattr(args, k) for k in keys})
    res = run_train(cfg)
    if args.json:
        _print_json(res)
    else:
        print(format_results(res))
        print(f"run directory: {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from headlab.evaluate import evaluate_run

    res = evaluate_run(args.run, args.cache)
    if args.json:
        _print_json(res)
    else:
        print(f"{res['head']} on {' '.join(res['cache'])} ({res['n']} rows)")
        for k in ("accuracy", "balanced_accuracy", "mcc", "auroc", "nll", "brier", "ece", "ace"):
            print(f"  {k:18s} {res[k]:.4f}")
    return 0


def _outputs(args: argparse.Namespace):
    from headlab.lab import load_outputs

    return load_outputs(args.run, logits_file=args.logits, out=args.out, ratio=args.val_select_ratio, seed=args.seed)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from headlab.lab import run_calibrate

    rec = run_calibrate(_outputs(args), method=args.method, variant=args.variant, seed=args.seed)
    if args.json:
        _print_json(rec)
        return 0
    print(f"{rec['method']} calibration fitted on val_select ({rec['fitted_on']['n']} rows)")
    print(f"{'':10s} {'split':10s} {'nll':>8} {'ece':>8} {'ace':>8} {'brier':>8}")
    for split, m in rec["metrics"].items():
        for when in ("before", "after"):
            r = m[when]
            print(f"{when:10s} {split:10s} {r['nll']:8.4f} {r['ece']:8.4f} {r['ace']:8.4f} {r['brier']:8.4f}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from headlab.lab import run_sweep

    rec = run_sweep(_outputs(args), target=args.target_fnr, definition=args.fnr_definition, rule=args.rule,
                    max_fdr=args.max_fdr)
    rec.pop("table")
    if args.json:
        _print_json(rec)
        return 0
    c = rec["chosen"]
    print(f"{rec['thresholds']} achievable thresholds on val_select ({rec['n']} rows, calibration: {rec['calibration']})")
    if c is None:
        print(f"no threshold keeps FNR ({rec['fnr_definition']}) <= {rec['target_fnr']}")
    else:
        thr = ", ".join(f"{k} = {c[k]:.6g}" for k in ("t_conf", "t_neg") if k in c)
        print(f"max coverage with FNR ({rec['fnr_definition']}) <= {rec['target_fnr']}: {thr}"
              + (f", t_pos = {rec['t_pos']:.6g}" if rec.get("t_pos") is not None else "")
              + f": coverage {c['coverage']:.4f} ({c['exits']} exits, {c['fn']} FN), accuracy {c['accuracy']:.4f}, "
              f"MCC {c['mcc']:.4f}")
    m = rec["mcc_optimal"]
    print(f"MCC-optimal decision threshold: p >= {m['tau']:.6g} (MCC {m['mcc']:.4f}, accuracy {m['accuracy']:.4f})")
    return 0


def _cmd_certify(args: argparse.Namespace) -> int:
    from headlab.lab import run_certify

    rec = run_certify(_outputs(args), alpha=args.alpha, delta=args.delta, definition=args.fnr_definition,
                      rule=args.rule, max_fdr=args.max_fdr, grid_size=args.grid_size)
    if args.json:
        _print_json(rec)
        return 0
    ltt = rec["ltt"]
    print(f"Learn-then-Test on val_calib ({rec['n_calib']} rows), grid of {ltt['grid']['size']} thresholds "
          f"fixed from val_select; FNR definition '{ltt['definition']}', alpha {ltt['alpha']}, delta {ltt['delta']}")
    if ltt["certified"]:
        pol = rec["policy"]
        thr = ", ".join(f"{k} = {pol[k]:.6g}" for k in ("t_conf", "t_neg", "t_pos") if pol.get(k) is not None)
        print(f"CERTIFIED {thr}: P(FNR <= {ltt['alpha']}) >= {1 - ltt['delta']:.3g}; {ltt['errors']} errors among "
              f"{ltt['effective_n']} effective samples, upper bound {ltt['upper_bound']:.4f}, p = {ltt['p_value']:.3g}, "
              f"coverage {ltt['coverage']:.4f}")
    else:
        print(ltt["reason"])
    if rec.get("crc"):
        c = rec["crc"]
        print("conformal risk control (expected system FNR): " +
              (f"t = {c['lam']:.6g}, coverage {c['coverage']:.4f}" if c["certified"] else c["reason"]))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from headlab.report import make_report

    res = make_report(_outputs(args), out_dir=args.report_dir)
    if args.json:
        _print_json(res)
    else:
        print(f"report: {res['html']} ({len(res['plots'])} plots)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from headlab.bundle import export_bundle

    m = export_bundle(args.run, args.out, decision_threshold=args.decision_threshold)
    if args.json:
        _print_json(m)
    else:
        pol = m["policy"]
        print(f"bundle {args.out}: head {m['head']['name']}, calibration {m['calibrator']}, exit policy "
              f"{pol['rule']} ({'certified' if pol['certified'] else 'NOT certified: everything defers'}), "
              f"{len(m['files'])} files with sha256 in manifest.json")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from headlab.predict import Predictor, expand_inputs, write_predictions

    if not args.out:
        raise Stage1Error("predict needs --out FILE.jsonl or FILE.csv")
    if not args.out.endswith((".jsonl", ".csv")):
        raise Stage1Error(f"--out {args.out!r}: use a .jsonl or .csv file name")
    paths = expand_inputs(args.images)
    pred = Predictor(args.bundle, backbone=args.backbone, weights=args.weights, device=args.device,
                     batch_size=args.batch_size, workers=args.workers, natix=args.natix)
    recs = pred.predict(paths)
    write_predictions(recs, args.out)
    ok = [r for r in recs if "error" not in r]
    exits = sum(r["action"] == "exit" for r in ok)
    summary = {"out": args.out, "images": len(recs), "errors": len(recs) - len(ok), "exits": exits,
               "defers": len(ok) - exits, "positives": sum(r["decision"] for r in ok)}
    if args.json:
        _print_json(summary)
    else:
        print(f"{len(recs)} images -> {args.out}: {exits} exit, {len(ok) - exits} defer, "
              f"{summary['positives']} predicted positive, {summary['errors']} unreadable")
    return 0


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    from headlab.recalibrate import recalibrate

    res = recalibrate(args.bundle, args.cache, args.out, ratio=args.val_select_ratio, seed=args.seed,
                      method=args.method)
    if args.json:
        _print_json(res)
        return 0
    d = res["drift"]
    print(f"new bundle {args.out} (parent {args.bundle})")
    for k, v in d["per_class"].items():
        print(f"  class {k}: KS {v['ks']:.4f} (p {v['ks_p_value']:.3g}), PSI {v['psi']:.4f}")
    print(f"  label prior {d['label_prior']['reference']:.4f} -> {d['label_prior']['new']:.4f}; ECE on the new batch "
          f"{d['ece_new_batch']['old_calibration']:.4f} (old calibration) -> {d['ece_new_batch']['new_calibration']:.4f}")
    old, new = d["policy"]["old"], d["policy"]["new"]
    print(f"  old policy on the new batch: coverage {old['coverage']:.4f}, FNR {old['fnr_conditional']:.4f}; "
          f"new policy: coverage {new['coverage']:.4f}, " + (
              "certified" if res["certificate"]["certified"] else res["certificate"]["reason"]))
    print(f"  drift report: {args.out}/drift.html")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from headlab.demo import run_demo

    res = run_demo(args.out, n_images=args.n_images, backbone=args.backbone, weights=args.weights,
                   workers=args.workers, progress=not args.quiet)
    if args.json:
        _print_json(res)
    return 0


# ---------------------------------------------------------------------------------------
# parser
def _add_common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="read options from a JSON or TOML file (keys = flag names; "
                                                    "flags on the command line win)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the machine-readable result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage1", description="Feature-cache-centric training, calibration and certification of "
                                   "stage-1 classifiers on a frozen DINOv3 backbone.")
    parser.add_argument("--version", action="version", version=f"stage1-pro {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(_handler=handler, _parser=p)
        return p

    from extract.backbone import FEATURE_SETS

    p = add("extract", _cmd_extract, "embed images with a frozen backbone into an HDF5 feature cache (resumable)")
    g = p.add_argument_group("inputs")
    g.add_argument("--images", action="append", metavar="DIR", help="image root; repeat to combine sources")
    g.add_argument("--labels", action="append", metavar="SPEC",
                   help="per --images, in order: a CSV (path,label[,group]; header optional), a JSON file, "
                        "'folders' (one sub-folder per class) or 'none' (default: unlabelled)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", metavar="SPEC", help="hf:<hub id or dir> or timm:<name or dir>")
    g.add_argument("--weights", metavar="FILE", help="timm: local weights file (safetensors or .pth)")
    g.add_argument("--preprocess", choices=["baseline", "hf"], default="baseline",
                   help="baseline: shorter side 256 bicubic + center-crop 224; hf: 224x224 bilinear (default: baseline)")
    g.add_argument("--image-size", type=int, default=224, help="network input side (default: 224)")
    g.add_argument("--feature-sets", nargs="+", choices=FEATURE_SETS, default=list(FEATURE_SETS),
                   help="feature sets to cache (default: cls patch_mean)")
    g = p.add_argument_group("output and run")
    g.add_argument("--out", metavar="DIR", help="cache directory (shard-NNNNN.h5 + extract.json)")
    g.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype (default: float16)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images decoded per batch (default: 64 on a CPU, sized from free memory on a GPU)")
    g.add_argument("--forward-batch", type=int, default=None,
                   help="images per model forward, a divisor of --batch-size; a run starts with two batches of "
                        "this size, then doubles it (default: 256 on a GPU, else the batch size)")
    g.add_argument("--decoder", choices=["auto", "nvimgcodec", "nvjpeg", "pil"], default="auto",
                   help="JPEG decoding: nvimgcodec = the GPU's hardware JPEG engines (nvImageCodec), nvjpeg = "
                        "batched on the GPU's SMs (torchvision), pil = CPU workers (default: auto, the first of "
                        "these the machine has)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the backbone with a static batch shape (default: auto, on a GPU)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, launch the compiled forward's kernels one by one instead of replaying them "
                        "as one CUDA graph (default: CUDA graphs)")
    g.add_argument("--shard-size", type=int, default=4096, help="inputs per shard, the unit of resumption (default: 4096)")
    g.add_argument("--workers", type=int, default=None, help="worker processes: PIL decoders, or file readers with a GPU decoder (default: min(8, CPUs))")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--max-failures", default="1%", help="undecodable images tolerated, count or share (default: 1%%)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)

    pc = sub.add_parser("cache", help="inspect, verify and merge feature caches")
    csub = pc.add_subparsers(dest="cache_command", metavar="ACTION")
    pc.set_defaults(_handler=None, _parser=pc)
    p = add("info", _cmd_cache_info, "rows, feature sets, labels, failures and provenance of a cache", csub)
    p.add_argument("paths", nargs="+", metavar="PATH", help="cache directory or shard files")
    _add_common(p)
    p = add("verify", _cmd_cache_verify, "check a cache end to end; exit 1 on any problem", csub)
    p.add_argument("paths", nargs="+", metavar="PATH", help="cache directory or shard files")
    _add_common(p, json_flag=False)
    p = add("merge", _cmd_cache_merge, "copy several caches (same fingerprint) into one shard file", csub)
    p.add_argument("paths", nargs="+", metavar="PATH", help="cache directories or shard files, in row order")
    p.add_argument("--out", required=True, metavar="FILE", help="the merged .h5 file (must not exist)")
    _add_common(p)

    p = add("train", _cmd_train, "train a grid of heads on cached features; the best is chosen on val_select")
    g = p.add_argument_group("data")
    g.add_argument("--train", nargs="+", metavar="CACHE", help="training cache(s)")
    g.add_argument("--val", nargs="+", metavar="CACHE", help="labelled validation cache(s)")
    g.add_argument("--out", metavar="DIR", help="run directory to create")
    g.add_argument("--val-select-ratio", type=float, default=0.5,
                   help="share of validation groups for selection; the rest certifies (default: 0.5)")
    g.add_argument("--max-memory", metavar="SIZE", help="stream training rows from HDF5 when holding them in memory "
                                                        "(float32) would exceed SIZE (e.g. 1GB; default: always in memory)")
    g = p.add_argument_group("grid (every combination is trained, sharing batches)")
    g.add_argument("--features", nargs="+", default=["cls"], choices=["cls", "patch_mean", "cls+patch_mean"],
                   help="feature sets (default: cls)")
    g.add_argument("--head", nargs="+", default=["mlp", "linear"], choices=["mlp", "linear"],
                   help="head kinds (default: mlp linear)")
    g.add_argument("--lr", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3], help="learning rates (default: 1e-4 3e-4 1e-3)")
    g.add_argument("--weight-decay", nargs="+", type=float, default=[0.01], help="AdamW weight decay (default: 0.01)")
    g.add_argument("--dropout", nargs="+", type=float, default=[0.3], help="mlp dropout (default: 0.3)")
    g.add_argument("--hidden", type=int, default=768, help="mlp hidden width (default: 768)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=30, help="maximum epochs (default: 30)")
    g.add_argument("--batch-size", type=int, default=256, help="rows per update (default: 256)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup (default: 1)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="(default: 0.1)")
    g.add_argument("--class-weights", choices=["balanced", "none"], default="balanced", help="(default: balanced)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA of weights, 0 disables (default: 0.9999)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm per head, 0 disables (default: 1.0)")
    g.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (default: 5)")
    g.add_argument("--select-metric", default="mcc", help="val_select metric that chooses (default: mcc)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g.add_argument("--knn-k", nargs="*", type=int, default=[10, 20, 50], help="k-NN baseline ks; none to skip (default: 10 20 50)")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="(default: 0.07)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)

    p = add("evaluate", _cmd_evaluate, "metrics of a run's chosen head on a labelled cache")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--cache", nargs="+", required=True, metavar="CACHE", help="labelled cache(s)")
    _add_common(p)

    def add_source(p):
        p.add_argument("run", nargs="?", metavar="RUN_DIR", help="run directory from `stage1 train`")
        p.add_argument("--logits", metavar="FILE.npz", help="instead of RUN_DIR: labels + logits (N,K) or probs (N,)")
        p.add_argument("--out", metavar="DIR", help="artifact directory (default: RUN_DIR; required with --logits)")
        p.add_argument("--val-select-ratio", type=float, default=0.5, help="--logits rows used for selection (default: 0.5)")
        p.add_argument("--seed", type=int, default=0, help="split seed for --logits (default: 0)")

    def add_rule(p):
        p.add_argument("--fnr-definition", choices=["conditional", "exits", "system"], default="conditional",
                       help="FN/positives among exits, FN/exits, or FN/all positives (default: conditional)")
        p.add_argument("--rule", choices=["max-softmax", "two-sided"], default="max-softmax",
                       help="exit when max(p,1-p) >= t, or p >= t_pos / p <= t_neg (default: max-softmax)")
        p.add_argument("--max-fdr", type=float, default=0.05,
                       help="two-sided: t_pos keeps false positives among positive exits <= this on val_select (default: 0.05)")

    p = add("calibrate", _cmd_calibrate, "fit a calibration map on val_select; metrics before/after")
    add_source(p)
    p.add_argument("--method", choices=["temperature", "dirichlet", "beta", "isotonic"], default="temperature",
                   help="(default: temperature)")
    p.add_argument("--variant", choices=["full", "diagonal"], default="full", help="Dirichlet W (default: full)")
    _add_common(p)

    p = add("sweep", _cmd_sweep, "every achievable exit threshold on val_select; max coverage under a target FNR")
    add_source(p)
    p.add_argument("--target-fnr", type=float, default=0.02, help="(default: 0.02)")
    add_rule(p)
    _add_common(p)

    p = add("certify", _cmd_certify, "certify the exit threshold on val_calib (Learn-then-Test, exact binomial)")
    add_source(p)
    p.add_argument("--alpha", type=float, default=0.02, help="FNR bound (default: 0.02)")
    p.add_argument("--delta", type=float, default=0.1, help="allowed failure probability (default: 0.1)")
    p.add_argument("--grid-size", type=int, default=200, help="thresholds in the val_select grid (default: 200)")
    add_rule(p)
    _add_common(p)

    p = add("report", _cmd_report, "PNG plots and one self-contained HTML report")
    add_source(p)
    p.add_argument("--report-dir", metavar="DIR", help="where to write (default: <out>/report)")
    _add_common(p)

    p = add("export", _cmd_export, "package head, calibration and certified exit policy into a deployment bundle")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="new bundle directory")
    p.add_argument("--decision-threshold", default="0.5",
                   help="operating decision threshold on the calibrated probability, or 'mcc' for the sweep's "
                        "MCC-optimal one (default: 0.5)")
    _add_common(p)

    p = add("predict", _cmd_predict, "raw images -> backbone -> head -> calibrator -> exit policy")
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", metavar="FILE", help="predictions, .jsonl or .csv")
    p.add_argument("--backbone", metavar="SPEC", help="load the backbone from here instead of the bundle's spec")
    p.add_argument("--weights", metavar="FILE", help="timm: local weights file")
    p.add_argument("--natix", action="store_true", help="remap probabilities so rounding at 0.5 gives the decision")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--workers", type=int, default=0, help="decode processes (default: 0)")
    p.add_argument("--device", default="auto", help="(default: auto)")
    _add_common(p)

    p = add("recalibrate", _cmd_recalibrate, "refit calibration and re-certify a bundle on a new labelled cache")
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--cache", nargs="+", required=True, metavar="CACHE", help="new labelled cache(s)")
    p.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="the new bundle")
    p.add_argument("--method", choices=["temperature", "dirichlet", "beta", "isotonic"],
                   help="calibration method (default: the bundle's)")
    p.add_argument("--val-select-ratio", type=float, default=0.5, help="(default: 0.5)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    _add_common(p)

    p = add("demo", _cmd_demo, "build demo images from scikit-learn's digits and run the whole pipeline on them")
    p.add_argument("--out", default="stage1-demo", metavar="DIR", help="where everything goes (default: stage1-demo)")
    p.add_argument("--n-images", type=int, default=2000, help="images to render (default: 2000)")
    p.add_argument("--backbone", metavar="SPEC", help="real backbone to use instead of the tiny random-init one")
    p.add_argument("--weights", metavar="FILE", help="timm: local weights file for --backbone")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: min(8, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "_handler", None):
            (getattr(args, "_parser", None) or parser).print_help()
            return 0 if not argv else 2
        args = apply_config(parser, argv, args)
        return int(args._handler(args) or 0)
    except Stage1Error as e:
        print(f"stage1: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stage1: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
