"""From the arrangement where decoding and the model overlap to the pipeline where they don't.

`extract_stall_engines.py` found one decode thread (JPEG engines only) beside a
graph-replayed model keeping both rates; `stage1 extract` end to end still runs at about
decode and model one after the other (benchmarks/NOTES.md). This script walks from the
one to the other in a single run, one change at a time, each for ``--seconds``:

  source   ``mem-1``: one decode thread on bytes in memory; ``mem-4``: four such threads
           sharing the decoder; ``pipe-4``: the real source (:func:`extract.pipeline.gpu_batches`:
           reader processes, four decode threads); ``-one-stream``: decode and resize on one
           stream (as before), else nvImageCodec decodes on a stream of its own;
           ``-chunk256``: 256 images per decoder call;
  model    ``none`` (the source alone), ``graph`` (the compiled model captured once as a
           CUDA graph, replayed), ``compiled`` (the compiled model called, as
           ``stage1 extract`` does); always on a side stream, at most two batches in flight.

The first row where images/s falls well under min(source alone, model alone) names the
change to look at. Prints a table; writes extract_bisect.json to --out.

Usage: python benchmarks/extract_bisect.py [--model vitb16] [--batch 1024] [--seconds 5]
       python benchmarks/extract_bisect.py --device cpu --n 64 --batch 8 --seconds 1  (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import capture_cuda_graph, machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402


def mem_source(bp, datas, batch: int, threads: int, stop: threading.Event, dev):
    """Batches decoded by ``threads`` threads from bytes in memory: yields ``(n, x)``."""
    cuda = dev.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=4)
    chunks = [datas[s:s + batch] for s in range(0, len(datas) - batch + 1, batch)]

    def work(k0: int) -> None:
        stream = torch.cuda.Stream(dev) if cuda else None
        k = k0
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            while not stop.is_set():
                imgs, _ = bp.decode(chunks[k % len(chunks)])
                x = bp.transform([im for im in imgs if im is not None])
                ev = None
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                while not stop.is_set():
                    try:
                        q.put((x, ev), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                k += threads

    ths = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for th in ths:
        th.start()
    try:
        while not stop.is_set():
            try:
                x, ev = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if ev is not None:
                torch.cuda.current_stream(dev).wait_event(ev)
                x.record_stream(torch.cuda.current_stream(dev))
            yield len(x), x
    finally:
        stop.set()
        for th in ths:
            th.join()


def pipe_source(items, batch: int, decoders: int, dev, decoder: str, readers, bp):
    from extract.pipeline import gpu_batches
    from extract.preprocess import Preprocessing

    batches = [list(range(s, min(s + batch, len(items)))) for s in range(0, len(items), batch)]
    for idx, x, _, _ in gpu_batches(items, batches, Preprocessing(decoder=decoder), dev, decoder=decoder,
                                    readers=readers, threads=4, decoders=decoders, preprocessor=bp):
        yield len(idx), x


def measure(source, model, seconds: float, dev, batch: int) -> float:
    """Images/s through ``model`` (None: the source alone) over ``seconds``, after one batch."""
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev) if cuda else None
    done, t0, events = 0, None, []
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext(), torch.inference_mode():
        for n, x in source:
            if n != batch:
                continue
            if model is not None:
                model(x)
            if cuda:
                ev = torch.cuda.Event()
                ev.record(side)
                events.append(ev)
                if len(events) >= 2:
                    events.pop(0).synchronize()
            if t0 is None:
                t0 = time.perf_counter()
                continue
            done += n
            if time.perf_counter() - t0 >= seconds:
                break
        if cuda:
            side.synchronize()
    close = getattr(source, "close", None)
    if close is not None:
        close()
    return done / (time.perf_counter() - t0) if t0 is not None else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--model", default="vitb16")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--decoder", default="nvimgcodec")
    ap.add_argument("--work", default="/tmp/stage1-extract-bench")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (no streams, no graph)")
    args = ap.parse_args()
    from extract.run import more_hardware_queues

    more_hardware_queues()  # before CUDA starts, as stage1 extract does
    from extract.backbone import load_backbone
    from extract.batch_decode import BatchPreprocessor
    from extract.preprocess import Preprocessing
    from extract.readers import ReaderPool
    from extract.sources import Item

    readers = ReaderPool(os.cpu_count(), threads=4)  # before the model, as run_extract does
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    root = os.path.join(args.work, "images")
    csv = build_images(root, args.n)
    files = [line.split(",")[0] for line in open(csv)][:args.n]
    items = [Item(os.path.join(root, f), f, 0, "s", "") for f in files]
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files[:min(len(files), 4 * args.batch)]]
    dtype = torch.bfloat16 if cuda else torch.float32
    bb = load_backbone(f"hf:{save_model(args.model, args.work)}").to(dev, dtype)
    f = torch.compile(bb, dynamic=False) if cuda else bb
    static = torch.zeros(args.batch, 3, 224, 224, device=dev, dtype=dtype)
    models = {"compiled": lambda x: f(x.to(dtype))}
    if cuda:
        graph = capture_cuda_graph(f, static, torch.cuda.Stream(dev))

        def replay(x):
            static.copy_(x)
            graph.replay()

        models = {"graph": replay, **models}
    decoder = args.decoder if cuda else "nvjpeg"
    res: dict = {"machine": machine(), "model": args.model, "batch": args.batch, "n": args.n, "rows": {}}

    def prep(**kw):
        return BatchPreprocessor(Preprocessing(decoder=decoder), dev, decoder=decoder, **kw)

    # sources: name -> (kind, threads, preprocessor options)
    sources = {"mem-1-one-stream": ("mem", 1, {"decode_stream": False}), "mem-1": ("mem", 1, {}),
               "mem-1-chunk256": ("mem", 1, {"decode_chunk": 256}), "mem-4": ("mem", 4, {}),
               "pipe-4-one-stream": ("pipe", 4, {"decode_stream": False}), "pipe-4": ("pipe", 4, {}),
               "pipe-4-chunk256": ("pipe", 4, {"decode_chunk": 256})}

    def ready_tensors():
        x = torch.randn(args.batch, 3, 224, 224, device=dev)
        while True:
            yield args.batch, x

    rows = [("ready", "graph" if cuda else "compiled")]
    for name, (kind, _, _) in sources.items():
        rows += [(name, "none")] + [(name, m) for m in models if kind == "pipe" or m == "graph" or not cuda]
    for src, m in rows:
        stop = threading.Event()
        if src == "ready":
            source = ready_tensors()
        else:
            kind, threads, opts = sources[src]
            if kind == "mem":
                source = mem_source(prep(**opts), datas, args.batch, threads, stop, dev)
            else:
                source = pipe_source(items, args.batch, threads, dev, decoder, readers, prep(**opts))
        rate = measure(source, None if m == "none" else models[m], args.seconds, dev, args.batch)
        stop.set()
        res["rows"][f"{src}/{m}"] = rate
        print(f"{src:18s} model {m:9s} {rate:8.0f} img/s", flush=True)
    readers.close()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "extract_bisect.json"), "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
