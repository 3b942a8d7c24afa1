"""Batch decode + resize in threads of one process, or in processes of their own, with and
without the compiled model running beside them (CUDA + nvImageCodec only).

The question: does the decode rate fall because the decode threads share one GIL with
the rest of the pipeline (nvImageCodec releases and retakes it per image), so that
moving them to another process would give the JPEG engines their full rate? And what
does a second CUDA context on the same GPU cost the model (contexts are time-sliced)?

Each configuration runs for ``--seconds``: decode workers loop over in-memory JPEGs
(``BatchPreprocessor.decode`` + ``transform``, batches of ``--batch``), while the
parent's main thread runs the compiled bf16 ViT-B/16 on a ready batch of 256, or idles.

Usage: OUT=/tmp python benchmarks/decode_procs_probe.py [--n 2048] [--seconds 6]
Results: $OUT/decode_procs_probe.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(root: str, csv: str, n: int) -> list[bytes]:
    files = [line.split(",")[0] for line in open(csv)][:n]
    return [open(os.path.join(root, f), "rb").read() for f in files]


def _decoders(threads: int, decoders: int, datas: list[bytes], batch: int, start, stop, ready) -> tuple[int, float]:
    """``threads`` threads sharing one BatchPreprocessor of ``decoders`` decoders, each
    looping decode + transform over ``datas`` until ``stop``: (images, seconds)."""
    import torch

    from extract.batch_decode import BatchPreprocessor
    from extract.preprocess import Preprocessing

    dev = torch.device("cuda")
    bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec", decoders=decoders)
    bp.warm_up(datas[0])
    chunks = [datas[s:s + batch] for s in range(0, len(datas) - batch + 1, batch)]
    for k in range(decoders):  # every decoder and the resize for this size, before the clock
        bp.transform([im for im in bp.decode(chunks[k % len(chunks)])[0] if im is not None])
    torch.cuda.synchronize()
    counts = [0] * threads
    ready()

    def loop(t: int) -> None:
        stream = torch.cuda.Stream(dev)
        k = t
        with torch.cuda.stream(stream):
            while not stop.is_set():
                imgs = bp.decode(chunks[k % len(chunks)], priority=k)[0]
                bp.transform([im for im in imgs if im is not None])
                counts[t] += len(imgs)
                k += threads
        stream.synchronize()

    start.wait()
    t0 = time.perf_counter()
    ths = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    torch.cuda.synchronize()
    return sum(counts), time.perf_counter() - t0


def _child(root, csv, n, threads, decoders, batch, ready, start, stop, results) -> None:
    datas = _load(root, csv, n)
    results.put(_decoders(threads, decoders, datas, batch, start, stop, lambda: ready.put(os.getpid())))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048, help="JPEGs in memory per decode process")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--only", nargs="*", default=None, help="the configurations whose names contain one of these")
    args = ap.parse_args()
    import torch

    from benchmarks._common import machine
    from benchmarks.extract_bench import build_images, save_model
    from extract.backbone import load_backbone

    work = "/tmp/stage1-extract-bench"
    root = os.path.join(work, "images")
    csv = build_images(root, max(args.n, 20000))
    bb = load_backbone(f"hf:{save_model('vitb16', work)}").to("cuda", torch.bfloat16)
    kernels = torch.compile(bb, dynamic=False)
    graphs = torch.compile(bb, dynamic=False, mode="reduce-overhead")

    def replay(x):  # each forward one CUDA graph launch
        torch.compiler.cudagraph_mark_step_begin()
        return graphs(x)

    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            kernels(x)
            replay(x)
    torch.cuda.synchronize()
    datas = _load(root, csv, args.n)
    ctx = mp.get_context("spawn")

    def run(label: str, *, with_model: bool, threads: int = 0, decoders: int = 1, procs: int = 0,
            cuda_graphs: bool = False) -> dict:
        model = replay if cuda_graphs else kernels
        stop_t, start_t = threading.Event(), threading.Event()
        out: dict = {"config": label}
        workers, got = [], []
        if procs:
            ready, results = ctx.Queue(), ctx.Queue()
            start_p, stop_p = ctx.Event(), ctx.Event()
            workers = [ctx.Process(target=_child, args=(root, csv, args.n, threads, decoders, args.batch,
                                                        ready, start_p, stop_p, results)) for _ in range(procs)]
            for w in workers:
                w.start()
            for _ in workers:
                ready.get(timeout=300)
        elif threads:
            ready_t = threading.Event()
            th = threading.Thread(target=lambda: got.append(
                _decoders(threads, decoders, datas, args.batch, start_t, stop_t, ready_t.set)))
            th.start()
            ready_t.wait(300)
        forwards = 0
        (start_p.set() if procs else start_t.set())
        t0 = time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - t0 < args.seconds:
                if with_model:
                    model(x)
                    forwards += 1
                    if forwards % 8 == 0:
                        torch.cuda.synchronize()
                else:
                    time.sleep(0.05)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        (stop_p.set() if procs else stop_t.set())
        if procs:
            got = [results.get(timeout=120) for _ in workers]
            for w in workers:
                w.join()
        elif threads:
            th.join()
        if with_model:
            out["model_images_per_s"] = round(forwards * 256 / wall)
        if got:
            out["decode_images_per_s"] = round(sum(n for n, _ in got) / max(s for _, s in got))
        print(json.dumps(out), flush=True)
        return out

    res = {"machine": machine(), "n": args.n, "batch": args.batch, "seconds": args.seconds, "runs": []}
    configs = [
        ("model alone", dict(with_model=True)),
        ("model (CUDA graphs) alone", dict(with_model=True, cuda_graphs=True)),
        ("threads 1, decoders 1", dict(with_model=False, threads=1, decoders=1)),
        ("threads 4, decoders 2 (the pipeline's)", dict(with_model=False, threads=4, decoders=2)),
        ("2 processes x (threads 2, decoders 1)", dict(with_model=False, threads=2, decoders=1, procs=2)),
        ("model + threads 4, decoders 2", dict(with_model=True, threads=4, decoders=2)),
        ("model (CUDA graphs) + threads 4, decoders 2", dict(with_model=True, threads=4, decoders=2, cuda_graphs=True)),
        ("model + 2 processes x (threads 2, decoders 1)", dict(with_model=True, threads=2, decoders=1, procs=2)),
        ("model + 1 process x (threads 4, decoders 2)", dict(with_model=True, threads=4, decoders=2, procs=1)),
    ]
    for label, kw in configs:
        if args.only and not any(o in label for o in args.only):
            continue
        res["runs"].append(run(label, **kw))
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "decode_procs_probe.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
