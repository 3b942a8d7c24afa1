"""The host-side Python of one batch decode, piece by piece (CUDA + nvImageCodec only).

For 1,024 JPEGs of 1280x720 in memory, times (median of rounds) each per-image step that
`BatchPreprocessor` runs around nvImageCodec's batch call -- CodeStream creation, the call
itself (new images, or the previous batch's images reused), and turning each decoded image
into a torch tensor (``__cuda_array_interface__`` or DLPack), or decoding into one torch buffer
for the batch (wrapped as nvImageCodec images, and the call into them) -- alone and with three other
threads running Python, as the pipeline's other threads do. A step whose time grows with
the other threads waits for the GIL (nvImageCodec's accessors release and retake it).

Usage: OUT=/tmp python benchmarks/decode_python_probe.py [--rounds 5] [--busy 3]
Results: $OUT/decode_python_probe.json (benchmarks/results/decode_python_probe.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402
from benchmarks.extract_bench import build_images  # noqa: E402
from extract.batch_decode import _make_nvimgcodec_decoder, nvimgcodec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--busy", type=int, default=3, help="threads running Python beside it")
    ap.add_argument("--only", nargs="*", default=None, help="these steps only")
    ap.add_argument("--switch-intervals", nargs="+", type=float, default=[0.005],
                    help="Python's switch interval(s) in s for the busy runs (default 0.005, Python's own)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    root = "/tmp/stage1-extract-bench/images"
    csv = build_images(root, args.n)
    files = [line.split(",")[0] for line in open(csv)][: args.n]
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
    n = nvimgcodec()
    hints = "nvjpeg_hw_decoder:preallocate_width_hint=1280 nvjpeg_hw_decoder:preallocate_height_hint=720 " \
            "nvjpeg_hw_decoder:preallocate_batch_size=1"
    dec = _make_nvimgcodec_decoder(dev, kind="hardware", options=hints)
    params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
    side = torch.cuda.Stream(dev)
    handle = side.cuda_stream

    def streams():
        return [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in datas]

    cs = streams()
    imgs = dec.decode(cs, params=params, cuda_stream=handle)
    torch.cuda.synchronize()

    # decoding into one torch buffer for the batch (all images here are 1280x720)
    h, w = imgs[0].shape[:2]
    buf = torch.empty((len(datas), h, w, 3), dtype=torch.uint8, device=dev)
    wrapped = n.as_images(list(buf.unbind(0)), cuda_stream=handle)
    dec.decode(cs, images=wrapped, params=params, cuda_stream=handle)
    torch.cuda.synchronize()
    same = all(torch.equal(buf[k], torch.as_tensor(im, device=dev)) for k, im in enumerate(imgs))
    print(f"decoded into the batch buffer: equal to nvImageCodec's own images: {same}", flush=True)
    cs_bytes = [n.CodeStream(bytes(d)) for d in datas]
    raw = [bytes(d) for d in datas]
    steps = {
        "codestreams": lambda: streams(),
        "codestreams_from_bytes_copies": lambda: [n.CodeStream(bytes(d)) for d in datas],
        "decode_call_codestreams_from_bytes": lambda: dec.decode(cs_bytes, params=params, cuda_stream=handle),
        "decode_call_raw_bytes": lambda: dec.decode(raw, params=params, cuda_stream=handle),
        "decode_call_new_images": lambda: dec.decode(cs, params=params, cuda_stream=handle),
        "decode_call_reusing_images": lambda: dec.decode(cs, images=imgs, params=params, cuda_stream=handle),
        "as_tensor_cuda_array_interface": lambda: [torch.as_tensor(im, device=dev) for im in imgs],
        "from_dlpack": lambda: [torch.from_dlpack(im) for im in imgs],
        "as_images_of_torch_views": lambda: n.as_images(list(buf.unbind(0)), cuda_stream=handle),
        "decode_call_into_batch_buffer": lambda: dec.decode(cs, images=wrapped, params=params, cuda_stream=handle),
        "one_accessor_per_image (shape)": lambda: [im.shape for im in imgs],
    }
    if args.only:
        steps = {k: v for k, v in steps.items() if k in args.only}
    res: dict = {"machine": machine(), "n": args.n, "busy_threads": args.busy, "batch_buffer_equal": same, "ms": {}}
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(2000))

    modes = ["alone"] + [f"busy, switch {v * 1e3:g} ms" for v in args.switch_intervals]
    for mode, interval in zip(modes, [sys.getswitchinterval(), *args.switch_intervals], strict=True):
        sys.setswitchinterval(interval)
        threads = []
        if mode != "alone":
            stop.clear()
            threads = [threading.Thread(target=spin, daemon=True) for _ in range(args.busy)]
            for t in threads:
                t.start()
        for name, fn in steps.items():
            times = []
            for _ in range(args.rounds):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                times.append((t1 - t0) * 1e3)
                del out
            res["ms"].setdefault(name, {})[mode] = round(statistics.median(times), 2)
            print(f"{mode:22s} {name:34s} {statistics.median(times):8.2f} ms per {args.n} images", flush=True)
        stop.set()
        for t in threads:
            t.join()
    for v in res["ms"].values():
        for m in modes[1:]:
            v[f"{m}: over alone"] = round(v[m] / v["alone"], 2) if v["alone"] else None
    out_dir = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out_dir, "decode_python_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res["ms"], indent=1))


if __name__ == "__main__":
    main()
