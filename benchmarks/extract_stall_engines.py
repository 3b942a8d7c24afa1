"""Does a decoder with the JPEG engines alone keep its rate beside the model? (H200; CUDA only.)

nvImageCodec with the hardware engines only (``HW_GPU_ONLY``), decode + GEMM resize,
alone and beside the model (ViT-B/16 compiled, CUDA graph replayed on a side stream, two
batches in flight): in a subprocess (another CUDA context, time-sliced with the model's)
and in a thread of the model's process. Results: benchmarks/results/extract_stall_engines.json.

Usage: OUT=/tmp python benchmarks/extract_stall_engines.py
"""

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from benchmarks._common import capture_cuda_graph, machine
from benchmarks.extract_bench import build_images, save_model
from benchmarks.extract_overlap import run_model

OUT = os.environ.get("OUT", "/tmp")
root = "/tmp/stage1-extract-bench/images"
csv = build_images(root, 2048)
files = [line.split(",")[0] for line in open(csv)][:2048]


def decode_worker(kind, seconds, ready_fd=None):
    from extract.batch_decode import BatchPreprocessor, nvimgcodec
    from extract.preprocess import Preprocessing

    dev = torch.device("cuda")
    n = nvimgcodec()
    datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
    chunks = [datas[s : s + 256] for s in range(0, len(datas), 256)]
    if kind == "hw":
        dec = n.Decoder(device_id=0, backends=[n.Backend(n.BackendKind.HW_GPU_ONLY)])
    else:
        dec = n.Decoder(device_id=0, backends=[n.Backend(n.BackendKind.GPU_ONLY)])
    params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
    bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
    s = torch.cuda.Stream(dev)

    def one(k):
        cs = [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in chunks[k % len(chunks)]]
        imgs = dec.decode(cs, params=params, cuda_stream=s.cuda_stream)
        ts = [torch.as_tensor(im, device=dev).permute(2, 0, 1) for im in imgs if im is not None]
        bp.transform(ts, layout="chw")
        s.synchronize()
        return len(ts)

    with torch.cuda.stream(s):
        for k in range(2):
            one(k)
        if ready_fd is not None:
            print("READY", flush=True)
            sys.stdin.readline()
        t0 = time.perf_counter()
        done = 0
        k = 0
        while time.perf_counter() - t0 < seconds:
            done += one(k)
            k += 1
    return done / (time.perf_counter() - t0)


if len(sys.argv) > 1 and sys.argv[1] == "worker":
    r = decode_worker(sys.argv[2], float(sys.argv[3]), ready_fd=True)
    print("RATE", r, flush=True)
    sys.exit(0)

dev = torch.device("cuda")
lib = (
    ctypes.CDLL("libcudart.so.13")
    if os.path.exists("/usr/local/cuda/lib64/libcudart.so.13")
    else None
)
side = torch.cuda.Stream(dev)
try:
    import cupy

    fl = cupy.cuda.runtime.streamGetFlags(side.cuda_stream)
    print("torch side stream flags:", fl, "(1 = non-blocking)")
except Exception as e:
    print("flags: n/a", e)
from extract.backbone import load_backbone  # noqa: E402

bb = load_backbone(f"hf:{save_model('vitb16', '/tmp/stage1-extract-bench')}").to(
    dev, torch.bfloat16
)
f = torch.compile(bb, dynamic=False)
x = torch.randn(512, 3, 224, 224, device=dev, dtype=torch.bfloat16)
g = capture_cuda_graph(f, x, side)


def model(seconds):
    return run_model(f, x, seconds, side, inflight=2, graph=g)  # two batches in flight


res = {"machine": machine(), "model_alone": model(3)}
print("model alone", res["model_alone"], flush=True)
for kind in ("hw",):
    # in a subprocess: alone, then beside the model
    for together in (False, True):
        p = subprocess.Popen(
            [sys.executable, __file__, "worker", kind, "5"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        while True:
            line = p.stdout.readline()
            if not line or "READY" in line:
                break
        if not line:
            print("worker died", kind, flush=True)
            continue
        p.stdin.write("go\n")
        p.stdin.flush()
        m = model(5) if together else (time.sleep(5) or 0)
        out = p.communicate()[0]
        rate = float([ln for ln in out.splitlines() if ln.startswith("RATE")][0].split()[1])
        res[f"subprocess_{kind}_{'together' if together else 'alone'}"] = {
            "decode": rate,
            "model": m,
        }
        print(
            f"subprocess {kind} decoder, {'with model' if together else 'alone'}: decode {rate:.0f} img/s, model {m:.0f}",
            flush=True,
        )
    # in-process thread beside the model
    box = {}
    th = threading.Thread(target=lambda box=box, kind=kind: box.update(r=decode_worker(kind, 5)))
    th.start()
    time.sleep(1.5)
    m = model(4)
    th.join()
    res[f"thread_{kind}_together"] = {"decode": box["r"], "model": m}
    print(
        f"thread {kind} decoder with model (partly): decode {box['r']:.0f} img/s, model {m:.0f}",
        flush=True,
    )
json.dump(res, open(os.path.join(OUT, "probe2.json"), "w"), indent=1)
