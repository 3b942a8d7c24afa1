"""Where the time of `stage1 extract` goes, phase by phase (CUDA only).

Runs `run_extract` end to end on the extract_bench image set (JPEGs of 1280x720) with
timers around the pipeline's parts -- the wait for the readers, the wait for and the hold of the decoder's lock, the whole decode call, the
resize -- and around each batch handed to the model. Prints, per model and setting, the
first batch (from the pipeline's start to its hand-over) and the median of each phase
over the later batches, beside the files-to-cache rate.

Usage: OUT=/tmp python benchmarks/extract_phases.py [--n 20000] [--models vitb16 vitl16] [--variants ...]
       [--rounds 2]
Results: $OUT/extract_phases.json (benchmarks/results/extract_phases.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extract.run import ExtractConfig, more_hardware_queues, run_extract  # noqa: E402

more_hardware_queues()  # before CUDA starts, as stage1 extract does

import extract.pipeline as pipeline  # noqa: E402
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402
from extract.batch_decode import BatchPreprocessor  # noqa: E402
from extract.mempool import set_release_threshold  # noqa: E402
from extract.readers import ReaderPool  # noqa: E402

EVENTS: list[tuple[str, str, float, float]] = []  # (phase, thread, start, end)
MODEL_EVENTS: list = []  # (start, end) CUDA events around each forward of the model, on its stream


def timed(name: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            EVENTS.append((name, threading.current_thread().name, t, time.perf_counter()))
    return wrapper


SETTING: dict = {}  # BatchPreprocessor attributes of the current run
MADE: list = []  # the BatchPreprocessors made, in order
VARIANTS = {  # name -> settings, each against the defaults of `extract`
    "defaults": {},
    "no warm-up on the first input": {"warm_up_sample": False},
    "1 decoder": {"decoders": 1},
    "3 decoders": {"decoders": 3},
    "1 decoder, normal priority": {"decoders": 1, "decode_priority": False},
    "not preallocated": {"preallocate": False},  # the engines' memory pool grown while decoding
    "first batch alone": {"first_alone": True},  # the other batches start once the first is decoded
    "decoders first come first served": {"batch_order": False},  # not to the earliest batch waiting
    "pool releases memory": {"keep_pool": False},  # CUDA's pool maps the decoded images afresh
    # each batch split: at most this share to the JPEG engines, the rest to the CUDA decoder (SMs)
    "engines 85 %": {"engine_share": 0.85},
    "engines 70 %": {"engine_share": 0.7},
    "batch 1024": {"batch_size": 1024},  # the automatic size before it was capped at 512
    "batch 512": {"batch_size": 512},
    "batch 256": {"batch_size": 256},  # one forward per decoded batch, no ramp
    # the model's forward on the whole decoded batch, and no ramp of small first batches
    "forward 1024": {"forward_batch": 1024},
    # Python hands the GIL over every 0.5 ms instead of 5 ms: a thread back from a C call that
    # released it (nvImageCodec's accessors, per image) waits less for a thread running Python
    "switch interval 0.5 ms": {"switch_interval": 0.0005},
    "switch interval 0.1 ms": {"switch_interval": 0.0001},
    # threads preparing batches (4 by default): each spends 200-330 ms per 1,024-image batch
    # outside the decode call, about as long as the call, so four barely keep two decoders busy
    "6 decode threads": {"decode_threads": 6},
    # every kernel of each forward launched by the main thread, under the GIL the decode threads
    # need, instead of one CUDA graph per forward (the default since the eighth session)
    "no cuda graphs": {"cuda_graphs": False},
    # decoded images as (3, H, W) views, permuted and sliced one by one (before the eighth
    # session's change to (H, W, 3) images stacked whole)
    "chw views": {"hwc_views": False},
    # nvImageCodec allocating each decoded image itself, each then wrapped as a tensor (before
    # the ninth session's decode into one buffer per image size and batch)
    "no batch buffers": {"batch_buffers": False},
    # the resize's GEMMs over the filter's support as it is, not padded to a multiple of 8
    # samples (before the ninth session: row strides not 16-byte aligned, an align-1 kernel)
    "unaligned resize": {"ALIGN": 1},
}
# settings of gpu_batches, not of the BatchPreprocessor: setting -> gpu_batches argument
PIPELINE_KEYS = {"first_alone": "first_alone", "decode_threads": "decoders"}
CONFIG_KEYS = {"batch_size", "forward_batch", "cuda_graphs"}  # settings of ExtractConfig
PROCESS_KEYS = {"switch_interval"}  # settings of the process, for the run


def instrument() -> None:
    init = BatchPreprocessor.__init__

    def patched_init(self, *a, **k):
        init(self, *a, **k)
        MADE.append(self)
        for key, value in SETTING.items():
            if key not in PIPELINE_KEYS.keys() | CONFIG_KEYS | PROCESS_KEYS:
                setattr(self, key, value)

    BatchPreprocessor.__init__ = patched_init
    warm_up = BatchPreprocessor.warm_up

    def patched_warm_up(self, sample=None, **k):  # "warm_up_sample": False: no decode of the sample
        if k.get("decode", True) and not getattr(self, "warm_up_sample", True):
            return
        warm_up(self, sample, **k)

    BatchPreprocessor.warm_up = patched_warm_up
    for name in ("decode", "transform", "_decode_chunk"):
        setattr(BatchPreprocessor, name, timed(name, getattr(BatchPreprocessor, name)))
    BatchPreprocessor._take_decoder = timed("decoder wait", BatchPreprocessor._take_decoder)
    ReaderPool.result = timed("read wait", ReaderPool.result)
    batches = pipeline.gpu_batches

    def patched_batches(*a, **k):
        k.update({PIPELINE_KEYS[key]: v for key, v in SETTING.items() if key in PIPELINE_KEYS})
        EVENTS.append(("pipeline start", "main", time.perf_counter(), time.perf_counter()))
        for b in batches(*a, **k):
            EVENTS.append(("batch out", "main", time.perf_counter(), time.perf_counter()))
            yield b

    pipeline.gpu_batches = patched_batches
    import torch

    compile_ = torch.compile

    def timed_compile(model, **k):  # the model's own time on the GPU, and the gaps between batches
        fn = compile_(model, **k)

        def forward(x):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y = fn(x)
            b.record()
            MODEL_EVENTS.append((a, b))
            return y
        return forward

    torch.compile = timed_compile


GC_FULL: list[dict] = []  # per full collection: objects in generation 2 before it, by type; objects collected


def watch_gc() -> None:
    """Garbage collections as phases ("gc gen N"), to see whether they line up with stalls.
    Before each full collection, the objects it will scan are counted by type (this adds
    to its time) and after it the number it freed (``GC_FULL``): a long one is either many
    objects to scan or costly finalisers."""
    import gc

    started: dict[int, float] = {}

    def cb(phase, info):
        th = threading.get_ident()
        if phase == "start":
            if info["generation"] == 2:
                objs = gc.get_objects(generation=2)
                kinds = collections.Counter(type(o).__name__ for o in objs)
                GC_FULL.append({"thread": threading.current_thread().name, "gen2_objects": len(objs),
                                "frozen": gc.get_freeze_count(), "at": time.perf_counter(),
                                "top_types": dict(kinds.most_common(8))})
                del objs
            started[th] = time.perf_counter()
        elif th in started:
            t0 = started.pop(th)
            t = time.perf_counter()
            EVENTS.append((f"gc gen {info['generation']}", threading.current_thread().name, t0, t))
            if info["generation"] == 2 and GC_FULL:
                GC_FULL[-1].update(collected=info["collected"], uncollectable=info["uncollectable"],
                                   ms=round((t - t0) * 1e3, 1))

    gc.callbacks.append(cb)


def stalls(events, min_ms: float = 300.0) -> list[dict]:
    """Each hand-over interval over ``min_ms``: when (from the pipeline's start), and for how
    long each phase ran inside it, per phase and thread (what the pipeline was doing)."""
    start = next(e[2] for e in events if e[0] == "pipeline start")
    outs = [e[2] for e in events if e[0] == "batch out"]
    found = []
    for k, (a, b) in enumerate(zip(outs, outs[1:], strict=False)):
        if (b - a) * 1e3 < min_ms:
            continue
        inside: dict[str, float] = collections.defaultdict(float)
        for name, thread, s0, s1 in events:
            ov = min(b, s1) - max(a, s0)
            if ov > 0 and name not in ("pipeline start", "batch out", "run end"):
                inside[f"{name} [{thread}]"] += ov
        found.append({"after_batch": k, "at_s": round(a - start, 3), "ms": round((b - a) * 1e3, 1),
                      "inside_ms": {n: round(v * 1e3, 1) for n, v in sorted(inside.items(), key=lambda kv: -kv[1])}})
    return found


def model_timeline() -> dict:
    """From the CUDA events of the batches' forwards (the compile's warm-up call excluded)."""
    ev = MODEL_EVENTS[1:]
    if len(ev) < 2:
        return {}
    busy = [a.elapsed_time(b) for a, b in ev]
    gaps = [b.elapsed_time(a2) for (_, b), (a2, _) in zip(ev, ev[1:], strict=False)]
    span = ev[0][0].elapsed_time(ev[-1][1])
    return {"model_ms": [round(v, 1) for v in busy], "gaps_ms": [round(v, 1) for v in gaps],
            "model_busy_share": round(sum(busy) / span, 3), "model_span_s": round(span / 1e3, 3)}


def summarise(events, decoders: int) -> dict:
    start = next(e[2] for e in events if e[0] == "pipeline start")
    outs = [e[2] for e in events if e[0] == "batch out"]
    first = outs[0]
    by = collections.defaultdict(list)
    for name, _, a, b in events:
        if name not in ("pipeline start", "batch out", "run end") and not name.startswith("gc gen"):
            by[name].append((a, b))
    res = {"first_batch_s": round(first - start, 3),
           "first_batch_phases_s": {n: round(sum(b - a for a, b in v if b <= first), 3) for n, v in by.items()},
           "median_interval_ms": round(1e3 * statistics.median(b - a for a, b in zip(outs[1:-1], outs[2:], strict=True)), 1),
           # every hand-over after the first, and from the last one to the end of run_extract (the
           # model's queued batches and the last writes): where files-to-cache loses to the median
           "intervals_ms": [round(1e3 * (b - a), 1) for a, b in zip(outs, outs[1:], strict=False)]}
    end = [e[2] for e in events if e[0] == "run end"]
    if end:
        res["tail_s"] = round(end[0] - outs[-1], 3)
    steady = {}
    for n, v in by.items():
        later = [b - a for a, b in v if a > first]
        if later:
            steady[n] = {"median_ms": round(1e3 * statistics.median(later), 1), "calls": len(later)}
    res["later_phases"] = steady
    gcs = [(n, b - a) for n, _, a, b in events if n.startswith("gc gen") and a > first]
    res["gc_after_first_batch"] = {"count": len(gcs), "total_ms": round(1e3 * sum(d for _, d in gcs), 1),
                                   "max_ms": round(1e3 * max((d for _, d in gcs), default=0.0), 1),
                                   "gen2": sum(1 for n, _ in gcs if n.endswith("2"))}
    res["stalls"] = stalls(events)
    # share of the later time the decoders were busy (1.0: decoding is the bottleneck)
    busy = sum(b - a for a, b in by.get("_decode_chunk", []) if a > first)
    busy -= sum(b - a for a, b in by.get("decoder wait", []) if a > first)
    if outs[-1] > first:
        res["decoder_busy_share"] = round(busy / (outs[-1] - first) / decoders, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--models", nargs="+", default=["vitb16", "vitl16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1, help="variants run in turn, the order reversed every other round")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    work = "/tmp/stage1-extract-bench"
    root = os.path.join(work, "images")
    csv = build_images(root, args.n)
    res: dict = {"machine": machine(), "n": args.n, "runs": []}
    instrument()
    watch_gc()
    for name in args.models:
        md = save_model(name, work)
        order = [v for r in range(args.rounds) for v in (args.variants if r % 2 == 0 else args.variants[::-1])]
        for k, variant in enumerate(order):
            SETTING.clear()
            SETTING.update(VARIANTS[variant])
            EVENTS.clear()
            MODEL_EVENTS.clear()
            GC_FULL.clear()
            out = os.path.join(work, f"phases-{name}-{k}")
            shutil.rmtree(out, ignore_errors=True)
            import torch

            set_release_threshold(torch.device("cuda"), 0)  # CUDA's default, as in a fresh process
            mem0 = torch.cuda.memory_stats()
            interval = sys.getswitchinterval()
            sys.setswitchinterval(SETTING.get("switch_interval", interval))
            try:
                s = run_extract(ExtractConfig(images=[root], labels=[csv], backbone=f"hf:{md}", out=out, progress=False,
                                              workers=os.cpu_count(), shard_size=8192, decoder="nvimgcodec",
                                              **{key: v for key, v in SETTING.items() if key in CONFIG_KEYS}))
            finally:
                sys.setswitchinterval(interval)
            EVENTS.append(("run end", "main", time.perf_counter(), time.perf_counter()))
            r = {"model": name, "variant": variant, "round": k // len(args.variants),
                 "images_per_s": s["images_per_s"], "steady_images_per_s": s["steady_images_per_s"],
                 **summarise(list(EVENTS), MADE[-1].decoders), **model_timeline()}
            mem1 = torch.cuda.memory_stats()  # cudaMalloc calls and retries (a retry frees the cache: a sync)
            start = next(e[2] for e in EVENTS if e[0] == "pipeline start")
            r["gc_full"] = [{**g, "at": round(g["at"] - start, 3)} for g in GC_FULL]  # at: s from the pipeline's start
            r["cuda_allocator"] = {k: mem1.get(k, 0) - mem0.get(k, 0)
                                   for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
            res["summary"] = summary(res["runs"])
            with open(os.path.join(out_dir, "extract_phases.json"), "w") as fh:
                json.dump(res, fh, indent=1)
    for line in res["summary"]:
        print(line)


def summary(runs: list[dict]) -> list[str]:
    """One line per (model, variant): files->cache and after-the-first-batch rates, each round."""
    by: dict = collections.defaultdict(list)
    for r in runs:
        by[(r["model"], r["variant"])].append((r["images_per_s"], r["steady_images_per_s"]))
    def rates(xs) -> str:
        return ", ".join("-" if v is None else f"{v:,.0f}" for v in xs)

    return [f"{m:7s} {v:32s} files->cache {rates(a for a, _ in x)}; after the first batch {rates(b for _, b in x)}"
            for (m, v), x in by.items()]


if __name__ == "__main__":
    main()
