"""What forking the reader processes costs, by the size of the process that forks them.

`stage1 extract` reads files in worker processes (:mod:`extract.readers`), started with
fork. A fork copies the page tables of the parent's memory, once per worker, so a parent
that already holds a loaded model and compiled code starts them slowly; `run_extract`
therefore starts them before loading anything. This prints the start-up time of the
pool and the time of its first 1,024 reads from a parent of ~0.3 GB (just torch) and
from parents holding 4 and 8 GB more, each in a fresh process.

Usage: python benchmarks/reader_start.py [--workers 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(root: str, workers: int, extra_gb: int) -> dict:
    import torch

    from extract.readers import ReaderPool

    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".jpg"))
    files = (files * (1024 // len(files) + 1))[:1024]
    held = torch.ones(extra_gb << 28) if extra_gb else None  # float32: 1 GB per 2**28, touched
    t0 = time.perf_counter()
    pool = ReaderPool(workers, threads=4)
    t1 = time.perf_counter()
    pool.result(pool.submit(files))
    t2 = time.perf_counter()
    pool.close()
    del held
    return {"extra_gb": extra_gb, "start_s": t1 - t0, "first_1024_reads_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.workers, int(args.child[1]))))
        return
    from benchmarks._common import machine
    from benchmarks.extract_bench import build_images

    root = os.path.join(tempfile.mkdtemp(prefix="stage1-reader-start-"), "images")
    build_images(root, 64)
    res = {"machine": machine(), "workers": args.workers, "runs": []}
    for gb in (0, 4, 8):
        out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--child", root, str(gb)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        res["runs"].append(r)
        print(f"parent + {gb} GB: pool start {r['start_s']:.2f} s, first 1,024 reads {r['first_1024_reads_s']:.2f} s",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reader_start.json"), "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
