"""A profiler trace of the simplest arrangement that fails to overlap (CUDA only).

`extract_bisect.py` found that one thread decoding bytes from memory and feeding a
graph-replayed model already falls to about decode and model one after the other. This
script records a few batches of that arrangement, and of the decode thread alone, with
torch.profiler (CPU and CUDA activities; CUPTI sees nvImageCodec's CUDA calls too) and
writes both traces (Chrome trace format, gzipped) and a per-stream summary.

Usage: OUT=/tmp python benchmarks/extract_trace.py [--batch 1024] [--batches 6]
       (``CUDA_DEVICE_MAX_CONNECTIONS=8`` in the environment: CUDA's default queues, as before)
Results: $OUT/trace_fed.json.gz, $OUT/trace_alone.json.gz, $OUT/trace_summary.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys
import threading

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import capture_cuda_graph, machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402
from benchmarks.extract_bisect import measure, mem_source  # noqa: E402


def summarise(prof) -> dict:
    """CUDA time per stream and the ten longest CUDA runtime calls of each kind."""
    busy: dict = collections.defaultdict(float)
    api: dict = collections.defaultdict(list)
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and "CUDA" in str(dt) and e.device_resource_id is not None:
            busy[f"stream {e.device_resource_id}"] += e.time_range.elapsed_us() / 1e3
        elif e.name.startswith("cuda"):
            api[e.name].append(e.time_range.elapsed_us() / 1e3)
    return {"gpu_ms_per_stream": dict(busy),
            "cuda_api_ms": {k: {"calls": len(v), "total": sum(v), "max": max(v)} for k, v in api.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--model", default="vitb16")
    args = ap.parse_args()
    from extract.run import more_hardware_queues

    more_hardware_queues()  # before CUDA starts, as stage1 extract does
    from torch.profiler import ProfilerActivity, profile

    from extract.backbone import load_backbone
    from extract.batch_decode import BatchPreprocessor
    from extract.preprocess import Preprocessing

    out, work = os.environ.get("OUT", "/tmp"), "/tmp/stage1-extract-bench"
    dev = torch.device("cuda")
    root = os.path.join(work, f"images-{4 * args.batch}")
    csv = build_images(root, 4 * args.batch)
    files = [line.split(",")[0] for line in open(csv)][:4 * args.batch]
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
    bb = load_backbone(f"hf:{save_model(args.model, work)}").to(dev, torch.bfloat16)
    f = torch.compile(bb, dynamic=False)
    static = torch.zeros(args.batch, 3, 224, 224, device=dev, dtype=torch.bfloat16)
    graph = capture_cuda_graph(f, static, torch.cuda.Stream(dev))

    def replay(x):
        static.copy_(x)
        graph.replay()

    res: dict = {"machine": machine(), "batch": args.batch,
                 "CUDA_DEVICE_MAX_CONNECTIONS": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}
    for name, model in (("alone", None), ("fed", replay)):
        bp = BatchPreprocessor(Preprocessing(decoder="nvimgcodec"), dev, decoder="nvimgcodec")
        stop = threading.Event()
        warm = measure(mem_source(bp, datas, args.batch, 1, stop, dev), model, 3.0, dev, args.batch)
        stop.set()
        stop = threading.Event()
        source = mem_source(bp, datas, args.batch, 1, stop, dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rate = measure(source, model, 0.0 + args.batches * args.batch / max(warm, 1.0), dev, args.batch)
        stop.set()
        path = os.path.join(out, f"trace_{name}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)
        try:
            summary = summarise(prof)
        except Exception as e:  # the traces are what matter
            summary = {"error": repr(e)}
        res[name] = {"warm_img_s": warm, "traced_img_s": rate, **summary}
        print(name, f"{warm:.0f} img/s, traced {rate:.0f}", json.dumps(summary.get("gpu_ms_per_stream")), flush=True)
    with open(os.path.join(out, "trace_summary.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
