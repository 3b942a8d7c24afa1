"""Which part of the decode path stalls beside the model? (H200 probe; CUDA only.)

The model (ViT-B/16, compiled, captured as a CUDA graph, replayed on a side stream with
two batches in flight) runs while a second thread loops one kind of work on its own
stream: CodeStream creation only (pure host work), nvImageCodec decode with the engines
and the CUDA decoder both allowed, the GEMM resize only, torchvision's batched nvJPEG,
and a plain 4096^3 matrix product. Prints iterations/s of each with and without the
model, then profiles the decode loop beside the model (torch.profiler; the trace goes to
$OUT/trace.json.gz). Results: benchmarks/results/extract_stall_probe.json.

Usage: OUT=/tmp python benchmarks/extract_stall_probe.py
"""

import json
import os
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from benchmarks._common import capture_cuda_graph, machine
from benchmarks.extract_bench import build_images, save_model
from benchmarks.extract_overlap import run_model
from extract.backbone import load_backbone
from extract.batch_decode import BatchPreprocessor, _make_nvimgcodec_decoder, nvimgcodec
from extract.preprocess import Preprocessing

OUT = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
root = "/tmp/stage1-extract-bench/images"
csv = build_images(root, 2048)
files = [line.split(",")[0] for line in open(csv)][:2048]
datas = [bytearray(open(os.path.join(root, f), "rb").read()) for f in files]
chunks = [datas[s : s + 256] for s in range(0, len(datas), 256)]
bb = load_backbone(f"hf:{save_model('vitb16', '/tmp/stage1-extract-bench')}").to(
    dev, torch.bfloat16
)
f = torch.compile(bb, dynamic=False)
x = torch.randn(512, 3, 224, 224, device=dev, dtype=torch.bfloat16)
side = torch.cuda.Stream(dev)
g = capture_cuda_graph(f, x, side)
n = nvimgcodec()
dec = _make_nvimgcodec_decoder(dev, kind="any")
params = n.DecodeParams(apply_exif_orientation=False, color_spec=n.ColorSpec.SRGB)
bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
pre = [
    torch.as_tensor(im, device=dev).permute(2, 0, 1)
    for im in dec.decode(
        [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in chunks[0]], params=params
    )
]
torch.cuda.synchronize()


def w_codestreams(k, s):
    [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in chunks[k % len(chunks)]]


def w_decode(k, s):
    cs = [n.CodeStream(np.frombuffer(d, dtype=np.uint8)) for d in chunks[k % len(chunks)]]
    dec.decode(cs, params=params, cuda_stream=s.cuda_stream)
    s.synchronize()


def w_transform(k, s):
    bp.transform(pre, layout="chw")
    s.synchronize()


def w_matmul(k, s):
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    (a @ a).sum().item()


def w_nvjpeg(k, s):
    from torchvision.io import decode_jpeg

    decode_jpeg(
        [torch.frombuffer(d, dtype=torch.uint8) for d in chunks[k % len(chunks)]], device=dev
    )
    s.synchronize()


def loop(work, stop, cnt):
    s = torch.cuda.Stream(dev)
    with torch.cuda.stream(s):
        k = 0
        while not stop.is_set():
            work(k, s)
            k += 1
            cnt[0] += 1


def model(seconds, mode):
    if mode == "none":
        time.sleep(seconds)
        return 0.0
    return run_model(f, x, seconds, side, inflight=2, graph=g)  # two batches in flight


res = {"machine": machine()}
for name, work in [
    ("codestreams", w_codestreams),
    ("decode", w_decode),
    ("transform", w_transform),
    ("nvjpeg", w_nvjpeg),
    ("matmul4k", w_matmul),
]:
    for mode in ("none", "graph"):
        stop, cnt = threading.Event(), [0]
        th = threading.Thread(target=loop, args=(work, stop, cnt))
        th.start()
        t0 = time.perf_counter()
        mr = model(4, mode)
        stop.set()
        th.join()
        rate = cnt[0] / (time.perf_counter() - t0)
        res[f"{name}_{mode}"] = {"iters_s": rate, "model_img_s": mr}
        print(f"{name:12s} model={mode:5s}: {rate:8.1f} iters/s  model {mr:6.0f} img/s", flush=True)
# profile the decode loop under the model
from torch.profiler import ProfilerActivity, profile  # noqa: E402

stop, cnt = threading.Event(), [0]
th = threading.Thread(target=loop, args=(w_decode, stop, cnt))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    th.start()
    model(2, "graph")
    stop.set()
    th.join()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
prof.export_chrome_trace(os.path.join(OUT, "trace.json"))
os.system(f"gzip {OUT}/trace.json")
json.dump(res, open(os.path.join(OUT, "probe.json"), "w"), indent=1)
