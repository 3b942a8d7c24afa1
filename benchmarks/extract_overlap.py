"""Do batch decoding and the model overlap on the GPU? One run, several arrangements.

On bytes already in memory (no file reads, no HDF5): the model alone (compiled, and
replayed as a CUDA graph), the per-batch cost of each step of nvImageCodec's path, each
decoder alone from one and two threads, then each decoder in a thread on its own stream
beside the model in the main thread on a side stream -- the model free-running, paced
(two batches in flight, waiting on events) or replayed as a graph, the decode stream at
normal or high priority. Results and what they showed: benchmarks/NOTES.md.

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
from benchmarks._common import capture_cuda_graph, machine  # noqa: E402
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


def run_model(f, x, seconds: float, stream, *, inflight: int = 0, graph=None) -> float:
    """Images/s of the model looping on ``x``. ``inflight`` > 0 paces the loop as the
    pipeline does: at most that many batches queued, waiting on an event (GIL released)
    instead of blocking inside a kernel launch with the queue full. ``graph``: replay a
    captured CUDA graph instead of calling ``f``."""
    done, t0, events = 0, time.perf_counter(), []
    with on(stream), torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            if graph is not None:
                graph.replay()
            else:
                f(x)
            done += len(x)
            if inflight and stream is not None:
                ev = torch.cuda.Event()
                ev.record(stream)
                events.append(ev)
                if len(events) >= inflight:
                    events.pop(0).synchronize()
        sync(stream)
    return done / (time.perf_counter() - t0)


def stage_costs(bp, chunks, dev, reps: int = 8) -> dict:
    """Host wall and CPU time (this thread) per batch for each step of nvImageCodec's path,
    the GPU synchronised after each step: where the per-batch Python goes."""
    import numpy as np

    from extract.batch_decode import _make_nvimgcodec_decoder, nvimgcodec

    n = nvimgcodec()
    dec = _make_nvimgcodec_decoder(dev, kind="hardware")
    params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
    stream = torch.cuda.current_stream(dev)
    acc: dict = {}

    def tick(name, t, c):
        w, cpu = time.perf_counter() - t, time.thread_time() - c
        a = acc.setdefault(name, [[], []])
        a[0].append(w)
        a[1].append(cpu)
        return time.perf_counter(), time.thread_time()

    for r in range(reps + 2):
        chunk = chunks[r % len(chunks)]
        t, c = time.perf_counter(), time.thread_time()
        cs = [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in chunk]
        t, c = tick("codestreams", t, c)
        imgs = dec.decode(cs, params=params, cuda_stream=stream.cuda_stream)
        stream.synchronize()
        t, c = tick("decode_call", t, c)
        ts = [torch.as_tensor(im, device=dev).permute(2, 0, 1) for im in imgs]
        t, c = tick("as_tensor", t, c)
        _ = [torch.from_dlpack(im) for im in imgs]
        t, c = tick("from_dlpack", t, c)
        bp.transform(ts, layout="chw")
        stream.synchronize()
        t, c = tick("transform", t, c)
        if r < 2:
            acc.clear()
    per = len(chunks[0])
    return {k: {"wall_ms": 1e3 * float(np.median(v[0])), "cpu_ms": 1e3 * float(np.median(v[1])),
                "us_per_image": 1e6 * float(np.median(v[0])) / per} for k, v in acc.items()}


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
    graph = None
    if cuda:  # the compiled model captured once as a CUDA graph: one launch per batch
        graph = capture_cuda_graph(f, x, side, warmup=1)
        res["model_graph_img_s"] = run_model(f, x, args.seconds, side, inflight=2, graph=graph)
        print(f"model alone, graph replay: {res['model_graph_img_s']:.0f} img/s", flush=True)
    if cuda and has_jpeg_engines(dev):
        bp0 = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
        res["stage_costs_per_batch_256"] = stage_costs(bp0, chunks, dev)
        for k, v in res["stage_costs_per_batch_256"].items():
            print(f"  {k:12s} wall {v['wall_ms']:7.2f} ms  cpu {v['cpu_ms']:7.2f} ms  ({v['us_per_image']:.1f} us/img)")
    variants = [("nvjpeg", False)] + ([("nvimgcodec", True)] if has_jpeg_engines(dev) else [])  # (name, decode stream)
    modes = [("free", 0, None), ("paced", 2, None)] + ([("graph", 2, graph)] if graph is not None else [])
    for dec, own_stream in variants:
        name = dec + ("+decode-stream" if own_stream else "")
        bp = BatchPreprocessor(Preprocessing(), dev, decoder=dec, decode_stream=own_stream)
        for _ in range(2):  # warm up: decoder, GEMM plans
            bp.transform([im for im in bp.decode(chunks[0])[0] if im is not None])
        sync(default)
        r = {}
        for threads in (1, 2):
            stop, count = threading.Event(), [0]
            ths = [threading.Thread(target=decode_loop, args=(bp, chunks, stop, count,
                                                              torch.cuda.Stream(dev) if cuda else None))
                   for _ in range(threads)]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            time.sleep(args.seconds)
            stop.set()
            for th in ths:
                th.join()
            r[f"decode_alone_{threads}_threads_img_s"] = count[0] / (time.perf_counter() - t0)
            print(f"[{name}] decode alone, {threads} thread(s): {r[f'decode_alone_{threads}_threads_img_s']:.0f} img/s")
        alone = r["decode_alone_1_threads_img_s"]
        for mode, inflight, g in modes:
            for prio in ((0, -1) if cuda else (0,)):
                dstream = torch.cuda.Stream(dev, priority=prio) if cuda else None
                stop, count = threading.Event(), [0]
                th = threading.Thread(target=decode_loop, args=(bp, chunks, stop, count, dstream))
                t0 = time.perf_counter()
                th.start()
                m = run_model(f, x, args.seconds, side, inflight=inflight, graph=g)
                stop.set()
                th.join()
                d = count[0] / (time.perf_counter() - t0)
                serial = 1 / (1 / res["model_alone_img_s"] + 1 / alone)
                key = f"{mode}_decode_priority_{'high' if prio else 'normal'}"
                r[key] = {"model_img_s": m, "decode_img_s": d, "if_serialised_img_s": serial}
                print(f"[{name}] model {mode:5s}, decode stream priority {'high' if prio else 'normal'}: "
                      f"model {m:.0f} img/s, decode {d:.0f} img/s (if serialised: {serial:.0f})", flush=True)
        res[name] = r
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "extract_overlap.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
