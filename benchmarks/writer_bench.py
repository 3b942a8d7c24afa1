"""The shard writer's cost per row: rows gathered and written every 4,096 against one write per call.

`extract` hands the writer one batch at a time (512 images on a GPU, 64 on a CPU). Each
h5py write of a batch costs a fixed share per dataset (resize + assign, nine datasets);
this measures ``ShardWriter.add_rows`` + ``finish`` per row with ViT-B/16-sized rows
(two 768-d float16 feature sets, paths, hashes, groups), the writer as it now is
(buffered) against ``flush_rows=1`` (every call written as it comes, as before), in
alternating rounds, best of each.

Usage: python benchmarks/writer_bench.py [--rows 40960] [--rounds 3]
Results: benchmarks/results/writer_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from cache import ShardWriter  # noqa: E402


def write(path: str, rows: int, batch: int, flush_rows: int | None) -> float:
    """Seconds per row to write ``rows`` rows in calls of ``batch``, finish included."""
    rng = np.random.default_rng(0)
    feats = {s: rng.normal(size=(batch, 768)).astype(np.float16) for s in ("cls", "patch_mean")}
    w = ShardWriter(path, feature_dims={"cls": 768, "patch_mean": 768}, provenance={"bench": True},
                    fingerprint="f" * 64, plan={"plan_id": "p" * 64, "input_start": 0, "input_stop": rows,
                                                "num_inputs": rows},
                    classes=["no roadwork", "roadwork"], flush_rows=flush_rows)
    t0 = time.perf_counter()
    for s0 in range(0, rows, batch):
        idx = list(range(s0, s0 + batch))
        w.add_rows(features=feats, labels=[i % 2 for i in idx],
                   paths=[f"images/source_a/2026/11/frame_{i:08d}.jpg" for i in idx],
                   sha256=[f"{i:064x}" for i in idx], source=["source_a"] * batch,
                   group=[f"{i // 4:064x}" for i in idx], index=idx)
    w.finish()
    seconds = time.perf_counter() - t0
    os.remove(path)
    return seconds / rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40960)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="stage1-writer-bench-")
    res: dict = {"machine": machine(), "rows": args.rows, "batches": {}}
    for batch in (64, 512):
        runs: dict[str, list[float]] = {"buffered": [], "one_write_per_call": []}
        for r in range(args.rounds):
            order = [("buffered", None), ("one_write_per_call", 1)]
            for name, flush in order if r % 2 == 0 else order[::-1]:
                runs[name].append(write(os.path.join(tmp, f"{name}.h5"), args.rows, batch, flush))
        best = {k: min(v) for k, v in runs.items()}
        res["batches"][str(batch)] = {
            "us_per_row": {k: round(v * 1e6, 2) for k, v in best.items()},
            "ms_per_batch": {k: round(v * batch * 1e3, 3) for k, v in best.items()},
            "speedup": round(best["one_write_per_call"] / best["buffered"], 2),
            "rounds_us_per_row": {k: [round(x * 1e6, 2) for x in v] for k, v in runs.items()}}
        b = res["batches"][str(batch)]
        print(f"batches of {batch}: {b['us_per_row']['buffered']:.1f} us per row buffered, "
              f"{b['us_per_row']['one_write_per_call']:.1f} one write per call: x{b['speedup']:.2f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "writer_bench.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print("results:", path)


if __name__ == "__main__":
    main()
