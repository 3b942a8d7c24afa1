"""The resize/crop/normalise of decoded batches on the GPU, alone: img/s and its kernels.

Decodes ``--n`` 1280x720 JPEGs of the bench's set once (nvImageCodec, into one buffer, as
``extract`` does) and times ``BatchPreprocessor.transform`` over them with CUDA events:
reading the decode buffer in place, and from separate images (stacked copies, as for images
of mixed origin). Then lists the CUDA kernels of one in-place transform (torch.profiler).

Usage: OUT=/tmp python benchmarks/resize_probe.py [--n 512] [--reps 20]
Results: $OUT/resize_probe.json (benchmarks/results/resize_probe.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images  # noqa: E402
from extract.batch_decode import BatchPreprocessor  # noqa: E402
from extract.preprocess import Preprocessing  # noqa: E402


def timed(fn, reps: int) -> float:
    """Seconds per call, CUDA events around ``reps`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    root = "/tmp/stage1-extract-bench/images"
    csv = build_images(root, max(args.n, 20000))
    files = [line.split(",")[0] for line in open(csv)][: args.n]
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
    dev = torch.device("cuda")
    bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
    imgs, cpu = bp.decode(datas)
    assert not cpu and all(im is not None for im in imgs)
    copies = [im.clone() for im in imgs]
    torch.cuda.synchronize()
    res = {"machine": machine(), "n": args.n, "image": list(imgs[0].shape)}
    t_in_place = timed(lambda: bp.transform(imgs), args.reps)
    t_stacked = timed(lambda: bp.transform(copies), args.reps)
    res["in_place_img_s"] = args.n / t_in_place
    res["stacked_img_s"] = args.n / t_stacked
    res["same_output"] = bool(torch.equal(bp.transform(imgs), bp.transform(copies)))
    print(f"transform, decode buffer in place: {res['in_place_img_s']:.0f} img/s; stacked copies: "
          f"{res['stacked_img_s']:.0f} img/s; same output: {res['same_output']}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bp.transform(imgs)
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        if e.device_time_total > 0:
            kernels.append({"name": e.key[:120], "calls": e.count, "us": round(e.device_time_total, 1)})
    kernels.sort(key=lambda k: -k["us"])
    res["kernels_one_transform"] = kernels[:25]
    res["kernel_us_per_image"] = round(sum(k["us"] for k in kernels) / args.n, 2)
    for k in kernels[:25]:
        print(f"{k['us']:10.1f} us {k['calls']:5d}x  {k['name']}")
    print(f"kernels: {res['kernel_us_per_image']} us per image")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "resize_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
