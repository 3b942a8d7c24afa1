"""Do batch decoding and the model overlap on the GPU? One run, several arrangements.

The end-to-end extract rate sits close to what decode and model give one *after* the
other (benchmarks/NOTES.md). This probe separates the suspects on bytes already in
memory (no file reads, no HDF5):
  model alone, decode+preprocess alone (each decoder), then both at once -- the decode
  loop in a thread on its own stream, the model in the main thread -- with the model on
  the legacy default stream or on a side stream, and nvImageCodec with and without
  reusing its output images (no device frees between batches).
If the arrangements differ, the winner goes into `extract`; if none overlaps, the cause
is elsewhere (host-side: GIL, launches).

Usage: python benchmarks/extract_overlap.py [--n 4096] [--model vitb16] [--seconds 8]
Writes extract_overlap.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402


def on(stream):
    """``torch.cuda.stream(stream)``, or nothing on a CPU smoke run."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def sync(stream) -> None:
    if stream is not None:
        stream.synchronize()


def decode_loop(bp, chunks, stop: threading.Event, counter: list, stream) -> None:
    with on(stream):
        k = 0
        while not stop.is_set():
            imgs, _ = bp.decode(chunks[k % len(chunks)])
            bp.transform([im for im in imgs if im is not None])
            counter[0] += len(chunks[k % len(chunks)])
            k += 1
            sync(stream)


def run_model(f, x, seconds: float, stream) -> float:
    done, t0 = 0, time.perf_counter()
    with on(stream), torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            f(x)
            done += len(x)
        sync(stream)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--model", default="vitb16")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--work", default="/tmp/stage1-extract-bench")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (no streams, no compile)")
    args = ap.parse_args()
    from extract.backbone import load_backbone
    from extract.batch_decode import BatchPreprocessor, has_jpeg_engines
    from extract.preprocess import Preprocessing

    root = os.path.join(args.work, "images")
    csv = os.path.join(root, "labels.csv")  # the extract_bench set when it is there
    if not os.path.exists(csv) or sum(1 for _ in open(csv)) < args.n:
        csv = build_images(root, args.n)
    files = [line.split(",")[0] for line in open(csv)][:args.n]
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
    chunks = [datas[s:s + 256] for s in range(0, len(datas), 256)]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    bb = load_backbone(f"hf:{save_model(args.model, args.work)}").to(dev, dtype)
    f = torch.compile(bb, dynamic=False) if cuda else bb
    x = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=dtype)
    with torch.inference_mode():
        for _ in range(3):
            f(x)
    default = torch.cuda.default_stream(dev) if cuda else None
    side = torch.cuda.Stream(dev) if cuda else None
    sync(default)
    res: dict = {"machine": machine(), "model": args.model, "batch": args.batch, "n": args.n}
    res["model_alone_img_s"] = run_model(f, x, args.seconds, default)
    print(f"model alone: {res['model_alone_img_s']:.0f} img/s", flush=True)
    variants = [("nvjpeg", False)] + ([("nvimgcodec", False), ("nvimgcodec", True)] if has_jpeg_engines(dev) else [])
    for dec, reuse in variants:
        name = dec + ("+reuse" if reuse else "")
        bp = BatchPreprocessor(Preprocessing(), dev, decoder=dec, reuse_images=reuse)
        for _ in range(2):  # warm up: decoder, GEMM plans
            bp.transform([im for im in bp.decode(chunks[0])[0] if im is not None])
        sync(default)
        stop, count, dstream = threading.Event(), [0], torch.cuda.Stream(dev) if cuda else None
        th = threading.Thread(target=decode_loop, args=(bp, chunks, stop, count, dstream))
        t0 = time.perf_counter()
        th.start()
        time.sleep(args.seconds)
        stop.set()
        th.join()
        alone = count[0] / (time.perf_counter() - t0)
        r = {"decode_alone_img_s": alone}
        for where, stream in (("default_stream", default), ("side_stream", side)):
            stop, count = threading.Event(), [0]
            th = threading.Thread(target=decode_loop, args=(bp, chunks, stop, count, dstream))
            t0 = time.perf_counter()
            th.start()
            m = run_model(f, x, args.seconds, stream)
            stop.set()
            th.join()
            d = count[0] / (time.perf_counter() - t0)
            serial = 1 / (1 / res["model_alone_img_s"] + 1 / alone)
            r[where] = {"model_img_s": m, "decode_img_s": d, "pipeline_bound_img_s": min(m, d),
                        "if_serialised_img_s": serial}
            print(f"[{name}] decode alone {alone:.0f}; together, model on the {where}: model {m:.0f} img/s, "
                  f"decode {d:.0f} img/s (if serialised: {serial:.0f})", flush=True)
        res[name] = r
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "extract_overlap.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
