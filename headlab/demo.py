"""`stage1 demo`: the whole pipeline on images rendered from scikit-learn's digits.

Nothing is downloaded. Unless ``--backbone`` names real weights, the backbone is a
tiny random-init DINOv3 saved locally: its features are untrained, so the figures
show the machinery working, not what DINOv3 can do.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cache.errors import Stage1Error
from cache.tools import cache_info, format_info, verify_cache
from headlab.demo_data import build_digits_dataset


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(out: str = "stage1-demo", *, n_images: int = 2000, backbone: str | None = None,
             weights: str | None = None, workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the demo data, extract train/val/test caches, inspect and verify them.

    Re-running reuses the images and resumes the caches (finished shards are kept).
    Returns where each artifact is and the headline figures.
    """
    from extract.run import ExtractConfig, run_extract

    t0 = time.perf_counter()
    data = os.path.join(out, "data")
    _say(f"[1/3] demo images: {n_images} digits rendered as JPEG/PNG files under {data}")
    csvs = build_digits_dataset(data, n_images=n_images, progress=progress)
    if backbone is None:
        from extract.tiny import save_tiny_hf

        bdir = os.path.join(out, "backbone-tiny-random")
        if not os.path.exists(os.path.join(bdir, "config.json")):
            save_tiny_hf(bdir, seed=0)
        backbone = f"hf:{bdir}"
        _say(f"      backbone: tiny random-init DINOv3 ({bdir}); its features are UNTRAINED, "
             "pass --backbone for real weights")
    caches = {}
    summaries = {}
    _say("[2/3] extract: one pass of the frozen backbone per split into HDF5 caches")
    for split, csv in csvs.items():
        cache_dir = os.path.join(out, "cache", split)
        cfg = ExtractConfig(images=[data], labels=[csv], backbone=backbone, weights=weights, out=cache_dir,
                            shard_size=512, progress=progress,
                            **({"workers": workers} if workers is not None else {}))
        s = run_extract(cfg)
        rate = f", {s['images_per_s']:.0f} img/s" if s.get("images_per_s") else ""
        _say(f"      {split:5s} {s['inputs'] - s['failures']:5d} rows, {s['failures']} failed to decode, "
             f"{s['shards_written']} shard(s) written / {s['shards_skipped']} reused{rate}")
        caches[split], summaries[split] = cache_dir, s
    _say("[3/3] cache info + verify")
    _say("\n".join("      " + line for line in format_info(cache_info(caches["train"])).splitlines()))
    for split, path in caches.items():
        problems = verify_cache(path)
        if problems:
            raise Stage1Error(f"demo cache {path} failed verification: {problems[0]}")
        _say(f"      verify {split}: OK")
    secs = time.perf_counter() - t0
    _say(f"\ndemo finished in {secs:.0f} s. Artifacts:\n  images + labels  {data}\n"
         + "".join(f"  cache {k:10s} {v}\n" for k, v in caches.items()))
    return {"out": out, "data": data, "csv": csvs, "caches": caches, "backbone": backbone,
            "extract": summaries, "seconds": round(secs, 1)}
