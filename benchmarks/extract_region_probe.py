"""Which nvImageCodec decoders take a region of interest, and at what cost? (CUDA only.)

Decoding only the pixels the recipe's resize and crop read (45 % of a 1280x720 frame under
the baseline recipe: a sub code stream with a region) would spare the decoder half its
output. On a CPU device (libjpeg-turbo) that region comes back exact. This probe decodes 64 frames of the bench
set in one call per decoder kind (the JPEG engines alone; the engines then the CUDA
decoder; the CUDA decoder alone) and region kind (whole image; the recipe's region; that
region widened to 16-pixel MCU edges; whole rows of that height), and records how many
came back, whether their shape is the one asked for, their largest difference from the
same place of the whole image, and the time per call (median of 5).

Usage: OUT=/tmp python benchmarks/extract_region_probe.py
Results: $OUT/extract_region_probe.json (benchmarks/results/extract_region_probe.json).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images  # noqa: E402
from extract.batch_decode import BatchPreprocessor, nvimgcodec, resized_size  # noqa: E402
from extract.preprocess import Preprocessing  # noqa: E402


def regions(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    r0, r1, c0, c1 = box
    down, up = (lambda v: v // 16 * 16), (lambda v, n: min(n, -(-v // 16) * 16))
    return {"whole": None, "recipe": box, "MCU-aligned": (down(r0), up(r1, h), down(c0), up(c1, w)),
            "whole rows": (down(r0), up(r1, h), 0, w)}


def recipe_region(bp: BatchPreprocessor, h: int, w: int) -> tuple[int, int, int, int]:
    """Rows ``r0:r1`` and columns ``c0:c1`` of an ``h x w`` image that the resize and crop read."""
    nh, nw = resized_size(h, w, bp.recipe)
    return (*bp._axis(h, nh)[1:], *bp._axis(w, nw)[1:])


def main() -> None:
    n = nvimgcodec()
    dev = torch.device("cuda")
    root = "/tmp/stage1-extract-bench/probe"
    csv = build_images(root, 64)
    datas = [np.frombuffer(open(os.path.join(root, line.split(",")[0]), "rb").read(), dtype=np.uint8)
             for line in open(csv)]
    bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
    params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
    kinds = {"engines": [n.BackendKind.HW_GPU_ONLY], "engines, then CUDA": [n.BackendKind.HW_GPU_ONLY, n.BackendKind.GPU_ONLY],
             "CUDA": [n.BackendKind.GPU_ONLY]}
    res: dict = {"machine": machine(), "images": len(datas), "runs": []}
    for kind, backends in kinds.items():
        try:
            dec = n.Decoder(device_id=0, backends=[n.Backend(b) for b in backends])
        except RuntimeError as e:  # seen: "Could not create decoder" for the CUDA decoder alone
            res["runs"].append({"decoder": kind, "error": repr(e)})
            print(json.dumps(res["runs"][-1]), flush=True)
            continue
        whole = None
        for name, box in regions(720, 1280, recipe_region(bp, 720, 1280)).items():
            streams = [n.CodeStream(d) for d in datas]
            if box is not None:
                streams = [s.get_sub_code_stream(region=n.Region(box[0], box[2], box[1], box[3])) for s in streams]
            try:
                out = list(dec.decode(streams, params=params))
                times = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    dec.decode(streams, params=params)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                error = None
            except Exception as e:  # noqa: BLE001 -- recorded, the probe goes on
                out, times, error = [None] * len(streams), [], repr(e)
            ok = [im for im in out if im is not None]
            arrays = [torch.as_tensor(im, device=dev).cpu() for im in ok]
            want = (720, 1280) if box is None else (box[1] - box[0], box[3] - box[2])
            shapes = sorted({tuple(a.shape[:2]) for a in arrays})
            diff = None
            if box is None:
                whole = [torch.as_tensor(im, device=dev).cpu() if im is not None else None for im in out]
            elif whole is not None and arrays and shapes == [want]:
                diff = max(int((a.int() - w[box[0]:box[1], box[2]:box[3]].int()).abs().max())
                           for a, w in zip(arrays, [w for w, im in zip(whole, out, strict=True) if im is not None],
                                           strict=True) if w is not None)
            r = {"decoder": kind, "region": name, "box": box, "decoded": len(ok), "shapes": shapes,
                 "shape_as_asked": shapes == [want], "max_abs_diff_vs_whole": diff,
                 "ms_per_call": round(1e3 * statistics.median(times), 2) if times else None, "error": error}
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "extract_region_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    good = [r for r in res["runs"] if r["decoder"] == "engines" and r["region"] == "recipe"
            and r["decoded"] == len(datas) and r["shape_as_asked"]]
    print("REGION_OK" if good else "REGION_NOT_ON_ENGINES")


if __name__ == "__main__":
    main()
