"""One extraction on 1 GPU and on N GPUs (torchrun), same inputs: speed-up and agreement.

Usage (on a machine with N GPUs): python benchmarks/extract_multigpu.py --gpus 2 [--n 20000] [--model vitl16]
Writes benchmarks/results/extract_multigpu.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402


def extract(cmd_prefix: list[str], root: str, csv: str, spec: str, out: str) -> tuple[list[dict], float]:
    cmd = [*cmd_prefix, "extract", "--images", root, "--labels", csv, "--backbone", spec, "--out", out,
           "--quiet", "--json", "--shard-size", "2048"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    dec = json.JSONDecoder()
    out_objs, txt, pos = [], r.stdout, 0
    while True:  # every rank prints one JSON summary
        pos = txt.find("{", pos)
        if pos < 0:
            break
        obj, end = dec.raw_decode(txt, pos)
        out_objs.append(obj)
        pos = end
    return out_objs, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--model", default="vitl16")
    ap.add_argument("--work", default="/tmp/stage1-multigpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    root = os.path.join(args.work, "images")
    csv = build_images(root, args.n)
    spec = f"hf:{save_model(args.model, args.work)}"
    py = [sys.executable, "-m", "headlab"]
    one, wall1 = extract(py, root, csv, spec, os.path.join(args.work, "one"))
    many, wall_n = extract([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}", "-m",
                            "headlab"], root, csv, spec, os.path.join(args.work, "many"))
    # files to cache, timed after each process compiled its model; ranks run side by side
    rate1 = one[0]["images_per_s"]
    rate_n = args.n / max(s["seconds"] for s in many)
    # after each process's first batch (a fixed start cost that a long extraction amortises)
    steady1 = one[0]["steady_images_per_s"]
    steady_n = sum(s["steady_images_per_s"] for s in many)
    from cache import open_cache

    with open_cache(os.path.join(args.work, "one")) as a, open_cache(os.path.join(args.work, "many")) as b:
        same_rows = a.paths.tolist() == b.paths.tolist() and a.index.tolist() == b.index.tolist()
        cos = {}
        for s in ("cls", "patch_mean"):
            fa, fb = a.features(s), b.features(s)
            num = np.sum(fa * fb, 1)
            cos[s] = float(np.min(num / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))))
            cos[s + "_bitwise_equal"] = bool(np.array_equal(fa, fb))
    res = {"machine": machine(), "model": args.model, "n": args.n, "gpus": args.gpus,
           "one_gpu": {"img_s": rate1, "wall_s": wall1, "summary": one},
           "n_gpus": {"img_s": rate_n, "wall_s": wall_n, "summaries": many},
           "speedup": rate_n / rate1, "speedup_steady": steady_n / steady1, "speedup_wall": wall1 / wall_n,
           "same_rows_same_order": same_rows,
           "min_cosine": cos}
    print(f"1 GPU {rate1:.0f} img/s; {args.gpus} GPUs {rate_n:.0f} img/s: x{rate_n / rate1:.2f} (after the first "
          f"batch x{steady_n / steady1:.2f}; whole command, start and compile included, x{wall1 / wall_n:.2f}); "
          f"same rows in order: {same_rows}; min cosine {cos}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "extract_multigpu.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
