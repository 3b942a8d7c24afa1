"""Files to cache only: `stage1 extract` end to end on the extract_bench image set (20,000
JPEGs of 1280x720), ViT-L/16 then ViT-B/16, with a check of the cache (rows, finite,
distinct). The shortest device call that gives the headline figure, for A/B runs when
device time is short. Results: $OUT/final.json (benchmarks/results/extract_quick.json).

Usage: OUT=/tmp python benchmarks/extract_quick.py
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.getcwd())
from benchmarks.extract_bench import build_images, save_model
from extract.run import ExtractConfig, more_hardware_queues, run_extract

more_hardware_queues()  # before CUDA starts

OUT = os.environ["OUT"]
work = "/tmp/stage1-extract-bench"
root = os.path.join(work, "images")
t = time.perf_counter()
csv = build_images(root, 20000)
print(f"images {time.perf_counter() - t:.0f} s", flush=True)
from benchmarks._common import machine  # noqa: E402

res = {"machine": machine()}
for name in ("vitl16", "vitb16"):
    md = save_model(name, work)
    out = os.path.join(work, f"cache-{name}")
    s = run_extract(
        ExtractConfig(
            images=[root],
            labels=[csv],
            backbone=f"hf:{md}",
            out=out,
            progress=False,
            workers=os.cpu_count(),
            shard_size=8192,
            decoder="nvimgcodec",
        )
    )
    from cache import open_cache

    with open_cache(out) as c:
        f = c.features("cls")
        s["check"] = {
            "rows": int(len(f)),
            "finite": bool(np.isfinite(f.astype(np.float32)).all()),
            "distinct_rows": int(len(np.unique(f[:2000].astype(np.float32), axis=0))),
        }
    res[name] = s
    print(name, s["images_per_s"], s["steady_images_per_s"], s["check"], flush=True)
    json.dump(res, open(os.path.join(OUT, "final.json"), "w"), indent=1, default=str)
