"""Who holds Python's GIL while `stage1 extract` runs (CUDA only; needs py-spy).

Runs `run_extract` once to warm torch's compile cache, then again with py-spy sampling
this process (``--gil``: a sample is taken only while some thread holds the GIL, and is
charged to that thread). Prints and saves, per thread role (main loop, decode threads,
writer, ...), the share of the run's wall time it held the GIL, and the functions it
held it in (self time, and the stage1 function that called into it).

Usage: OUT=/tmp python benchmarks/extract_gil_profile.py [--model vitb16] [--n 20000] [--rate 250]
Results: $OUT/extract_gil_profile.json, $OUT/gil_<model>.txt (py-spy's raw stacks).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from extract.run import ExtractConfig, more_hardware_queues, run_extract  # noqa: E402

more_hardware_queues()  # before CUDA starts, as stage1 extract does

from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images, save_model  # noqa: E402

ROLES = [("stage1-decode", "decode threads"), ("stage1-write", "writer"), ("stage1-cpu-decode", "cpu decode"),
         ("MainThread", "main (model loop)")]


def role(thread: str) -> str:
    return next((r for prefix, r in ROLES if thread.startswith(prefix)), "other: " + re.sub(r"_\d+$", "", thread))


def parse(path: str) -> list[tuple[str, list[str], int]]:
    """py-spy raw lines: ``thread (tid): name;frame;frame... count`` -> (thread name, frames, count)."""
    out = []
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        head, *frames = stack.split(";")
        name = head.split(": ", 1)[1] if ": " in head else head
        out.append((name, frames, int(n)))
    return out


def ours(frame: str) -> bool:
    return any(f"/{p}/" in frame for p in ("extract", "cache", "headlab"))


def summarise(stacks, seconds: float, rate: float) -> dict:
    total = rate * seconds  # samples the run would give if the GIL were always held
    by_role: dict[str, int] = collections.Counter()
    leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    caller: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    compile_samples = 0
    for name, frames, n in stacks:
        if any("torch/_dynamo" in f or "torch/_inductor" in f for f in frames):
            compile_samples += n  # the second run's compile check (cached), not the loop
            continue
        r = role(name)
        by_role[r] += n
        leaf[r][frames[-1] if frames else "?"] += n
        own = [f for f in frames if ours(f)]
        caller[r][own[-1] if own else "(outside stage1)"] += n
    return {"seconds": round(seconds, 3), "rate_hz": rate, "compile_samples_dropped": compile_samples,
            "gil_held_share": round(sum(by_role.values()) / total, 3),
            "by_role": {r: {"share_of_wall": round(n / total, 3), "samples": n,
                            "top_functions": [[f, round(k / total, 4)] for f, k in leaf[r].most_common(12)],
                            "top_stage1_callers": [[f, round(k / total, 4)] for f, k in caller[r].most_common(12)]}
                        for r, n in by_role.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vitb16")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default: 250)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    work = "/tmp/stage1-extract-bench"
    root = os.path.join(work, "images")
    csv = build_images(root, args.n)
    md = save_model(args.model, work)

    def extract(k: int) -> dict:
        out = os.path.join(work, f"gil-{args.model}-{k}")
        shutil.rmtree(out, ignore_errors=True)
        return run_extract(ExtractConfig(images=[root], labels=[csv], backbone=f"hf:{md}", out=out, progress=False,
                                         workers=os.cpu_count(), shard_size=8192, decoder="nvimgcodec"))

    warm = extract(0)
    print(f"warm-up run: {warm['images_per_s']:.0f} img/s", flush=True)
    try:  # let a child trace this process where Yama's ptrace_scope would forbid it
        ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # PR_SET_PTRACER, PR_SET_PTRACER_ANY
    except (OSError, AttributeError):
        pass
    raw = os.path.join(out_dir, f"gil_{args.model}.txt")
    spy: list[subprocess.Popen] = []
    freeze = gc.freeze

    def start_then_freeze() -> None:  # run_extract freezes the collector right before its loop
        if not spy:
            spy.append(subprocess.Popen([args.py_spy, "record", "--pid", str(os.getpid()), "--gil", "--threads",
                                         "--nonblocking", "--full-filenames", "-r", str(args.rate), "-f", "raw", "-o", raw],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(2.0)  # attached before the loop's clock starts
            if spy[0].poll() is not None:
                sys.exit(f"py-spy exited: {spy[0].stderr.read().decode()[-2000:]}")
        freeze()

    gc.freeze = start_then_freeze
    try:
        s = extract(1)
    finally:
        gc.freeze = freeze
    spy[0].send_signal(signal.SIGINT)
    err = spy[0].communicate(timeout=120)[1].decode()
    seconds = s["seconds"]  # the loop: from the first batch's request to the last shard written
    res = {"machine": machine(), "model": args.model, "n": args.n, "run": s, "py_spy_tail": err[-500:],
           **summarise(parse(raw), seconds, args.rate)}
    with open(os.path.join(out_dir, "extract_gil_profile.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"profiled run: {s['images_per_s']:.0f} img/s files to cache over {seconds:.2f} s; "
          f"GIL held {res['gil_held_share']:.0%} of it", flush=True)
    for r, v in res["by_role"].items():
        print(f"  {r:24s} {v['share_of_wall']:.1%}  " + "; ".join(f"{f} {k:.1%}" for f, k in v["top_functions"][:4]))


if __name__ == "__main__":
    main()
