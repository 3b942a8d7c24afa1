"""`extract` throughput on a GPU box, measured in one run.

Builds a realistic JPEG set (default 20,000 files, 1280x720, photo-like content, q90),
random-init DINOv3 ViT-B/16 and ViT-L/16 (real architectures, transformers), and
measures images/s of
  (a) the baseline a competent user writes: PIL decode + torchvision transforms in a
      DataLoader with all CPU workers, transformers model in eager bf16 autocast;
  (b) `stage1 extract` end to end, files to finished cache, with each GPU decoder
      (nvImageCodec on the JPEG engines, torchvision nvJPEG) and the compiled bf16 model;
  (c) the model alone, compiled bf16, on ready tensors (the ceiling);
plus the decode+preprocess stage alone. Prints (b)/(a) and (b)/(c) and writes JSON.

Usage: python benchmarks/extract_bench.py [--n 20000] [--models vitb16 vitl16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import machine  # noqa: E402

MODELS = {"vits16": (384, 12, 6, 1536), "vitb16": (768, 12, 12, 3072), "vitl16": (1024, 24, 16, 4096)}


def _make(args):
    """One 1280x720 photo-like JPEG (q90): gradient sky, noisy texture, a few shapes."""
    i, root, seed = args
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed + i)
    w, h = 1280, 720
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(60, 230, 3), rng.uniform(20, 160, 3)
    global _NOISE
    if "_NOISE" not in globals():  # one texture bank per worker process, cropped per image
        _NOISE = np.random.default_rng(seed).normal(0, 9, (h + 64, w + 64, 1)).astype(np.float32)
    oy, ox = rng.integers(0, 64, 2)
    img = _NOISE[oy:oy + h, ox:ox + w] + (top * (1 - t) + bottom * t).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 100)), int(rng.integers(0, h - 100))
        x1, y1 = x0 + int(rng.integers(40, 400)), y0 + int(rng.integers(40, 300))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    label = int(rng.random() < 0.4)
    if label:  # an orange cone
        cx, cy = int(rng.integers(100, w - 100)), int(rng.integers(200, h - 20))
        draw.polygon([(cx, cy - 150), (cx - 60, cy), (cx + 60, cy)], fill=(255, 120, 0))
    name = f"img{i:06d}.jpg"
    im.save(os.path.join(root, name), quality=90)
    return name, label


def build_images(root: str, n: int) -> str:
    os.makedirs(root, exist_ok=True)
    csv = os.path.join(root, "labels.csv")
    if os.path.exists(csv) and sum(1 for _ in open(csv)) == n:
        return csv
    with Pool(os.cpu_count()) as pool:
        rows = pool.map(_make, [(i, root, 0) for i in range(n)], chunksize=64)
    with open(csv, "w") as fh:
        fh.writelines(f"{a},{b}\n" for a, b in rows)
    return csv


def save_model(name: str, root: str) -> str:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    d = os.path.join(root, f"dinov3-{name}-random")
    if not os.path.exists(os.path.join(d, "config.json")):
        h, layers, heads, inter = MODELS[name]
        torch.manual_seed(0)
        cfg = DINOv3ViTConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=inter, num_register_tokens=4, patch_size=16, image_size=224)
        DINOv3ViTModel(cfg).save_pretrained(d)
    return d


def ceiling(model_dir: str, batch: int, iters: int = 30, mode: str | None = None) -> float:
    """Compiled bf16 model alone on ready tensors: images/s. ``mode``: torch.compile's
    (``"reduce-overhead"``: CUDA graphs, as `extract` runs it)."""
    from extract.backbone import load_backbone

    bb = load_backbone(f"hf:{model_dir}").to("cuda", torch.bfloat16)
    f = torch.compile(bb, dynamic=False, mode=mode)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)

    def step():
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return f(x)

    with torch.inference_mode():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def baseline(root: str, csv: str, model_dir: str, n: int, batch: int = 256) -> float:
    """PIL + torchvision transforms in a DataLoader with every CPU worker; eager bf16 autocast."""
    from PIL import Image
    from torchvision import transforms as T
    from transformers import AutoModel

    files = [line.split(",")[0] for line in open(csv)][:n]
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return tf(Image.open(os.path.join(root, files[i])).convert("RGB"))

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).cuda().eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):  # warm the model first
        model(pixel_values=torch.randn(batch, 3, 224, 224, device="cuda"))
    torch.cuda.synchronize()
    dl = torch.utils.data.DataLoader(DS(), batch_size=batch, num_workers=os.cpu_count(), pin_memory=True)
    out = []
    # Timed from the loader's start: workers must not prefetch while the clock is stopped.
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in dl:
            out.append(model(pixel_values=x.cuda(non_blocking=True)).last_hidden_state[:, 0].float().cpu())
    return len(files) / (time.perf_counter() - t0)


def decode_only(root: str, csv: str, n: int, batch: int = 256, decoder: str = "nvjpeg") -> float:
    from extract.pipeline import gpu_batches
    from extract.preprocess import Preprocessing
    from extract.sources import Item

    files = [line.split(",")[0] for line in open(csv)][:n]
    items = [Item(os.path.join(root, f), f, 0, "s", "") for f in files]
    batches = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    t0, seen = None, 0
    for k, (idx, _x, _, _) in enumerate(gpu_batches(items, batches, Preprocessing(), torch.device("cuda"),
                                                   decoder=decoder, threads=2 * os.cpu_count())):
        if k == 1:
            torch.cuda.synchronize()
            t0, seen = time.perf_counter(), 0
        seen += len(idx)
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def nvjpeg_alone(root: str, csv: str, n: int = 4096, batch: int = 256) -> float:
    """torchvision's batched nvJPEG decode alone, on bytes already in memory: images/s."""
    from torchvision.io import ImageReadMode, decode_jpeg

    files = [line.split(",")[0] for line in open(csv)][:n]
    data = [torch.frombuffer(bytearray(open(os.path.join(root, f), "rb").read()), dtype=torch.uint8) for f in files]
    decode_jpeg(data[:batch], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        decode_jpeg(data[s:s + batch], mode=ImageReadMode.RGB, device="cuda")
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def nvimgcodec_alone(root: str, csv: str, n: int = 4096, batch: int = 256, threads: int = 1) -> float:
    """nvImageCodec on the hardware JPEG engines alone (bytes in memory, batches of
    ``batch``, ``threads`` host threads each with its own decoder): images/s."""
    from concurrent.futures import ThreadPoolExecutor

    from extract.batch_decode import _make_nvimgcodec_decoder, nvimgcodec

    nv = nvimgcodec()
    files = [line.split(",")[0] for line in open(csv)][:n]
    data = [open(os.path.join(root, f), "rb").read() for f in files]
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB)
    decs = [_make_nvimgcodec_decoder(torch.device("cuda"), kind="hardware") for _ in range(threads)]
    chunks = [data[s:s + batch] for s in range(0, n, batch)]

    def work(k: int) -> int:
        got = 0
        for c in chunks[k::threads]:
            imgs = decs[k].decode([nv.CodeStream(d) for d in c], params=params)
            got += sum(im is not None for im in imgs)
        torch.cuda.synchronize()
        return got

    decs[0].decode([nv.CodeStream(d) for d in chunks[0]], params=params)  # warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        got = sum(ex.map(work, range(threads)))
    dt = time.perf_counter() - t0
    if got != n:
        print(f"  nvimgcodec: {n - got} of {n} images not decoded by the engines", flush=True)
    return n / dt


def stage_profile(root: str, csv: str, decoder: str, n: int = 4096, batch: int = 256, readers: int = 8) -> dict:
    """Images/s of each stage of the producer on its own: read+hash+header check (thread
    pool), batch decode (bytes in memory), resize/crop/normalise (decoded images ready);
    and how much a Python thread gets done while another thread decodes (1.0: the decode
    call releases the GIL)."""
    import threading

    from extract.batch_decode import BatchPreprocessor
    from extract.preprocess import Preprocessing
    from extract.readers import ReaderPool
    from extract.sources import Item

    files = [line.split(",")[0] for line in open(csv)][:n]
    items = [Item(os.path.join(root, f), f, 0, "s", "") for f in files]
    out = {}
    rp = ReaderPool(readers)
    t0 = time.perf_counter()
    futs = [rp.submit([it.file for it in items[s:s + batch]]) for s in range(0, n, batch)]
    got = [r for f in futs for r in rp.result(f)]
    out["read_hash_check_img_s"] = n / (time.perf_counter() - t0)
    out["readers"] = readers if rp.uses_processes else 0
    rp.close()
    datas = [g.data for g in got]
    bp = BatchPreprocessor(Preprocessing(), torch.device("cuda"), decoder=decoder)
    chunks = [datas[s:s + batch] for s in range(0, n, batch)]
    bp.decode(chunks[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in chunks:
        imgs, _ = bp.decode(c)
    torch.cuda.synchronize()
    out["decode_img_s"] = n / (time.perf_counter() - t0)
    bp.transform(imgs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(8):
        bp.transform(imgs)
    torch.cuda.synchronize()
    out["transform_img_s"] = 8 * len(imgs) / (time.perf_counter() - t0)

    def spin(seconds: float) -> int:
        k, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            k += 1
        return k

    alone = spin(0.5)
    th = threading.Thread(target=lambda: [bp.decode(c) for c in chunks[:8]])
    t0 = time.perf_counter()
    th.start()
    k = 0
    while th.is_alive():
        k += spin(0.01)
    out["python_progress_while_decoding"] = k / (time.perf_counter() - t0) / (alone / 0.5)
    return out


def decoder_agreement(root: str, csv: str, n: int = 64) -> dict:
    """Pixels of each GPU decoder vs PIL (libjpeg-turbo) on the same files."""
    from PIL import Image

    from extract.batch_decode import BatchPreprocessor
    from extract.preprocess import Preprocessing

    files = [os.path.join(root, line.split(",")[0]) for line in open(csv)][:n]
    datas = [open(f, "rb").read() for f in files]
    ref = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).int() for f in files]
    out = {}
    for dec in ("nvimgcodec", "nvjpeg"):
        bp = BatchPreprocessor(Preprocessing(), torch.device("cuda"), decoder=dec)
        imgs, cpu = bp.decode(datas)
        diffs = [(bp.chw(im).cpu().int() - r).abs().float() for im, r in zip(imgs, ref, strict=True) if im is not None]
        out[dec] = {"decoded": len(diffs), "max_abs": max(float(d.max()) for d in diffs),
                    "mean_abs": float(np.mean([float(d.mean()) for d in diffs]))}
    return out


def save(res: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "extract_bench.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2, default=str)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--baseline-n", type=int, default=8000)
    ap.add_argument("--models", nargs="+", default=["vitb16", "vitl16"])
    ap.add_argument("--work", default="/tmp/stage1-extract-bench")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--decoders", nargs="+", default=["nvimgcodec", "nvjpeg"])
    args = ap.parse_args()
    from extract.run import more_hardware_queues

    more_hardware_queues()  # before CUDA starts, as stage1 extract does
    from extract.run import ExtractConfig, run_extract

    t = time.perf_counter()
    root = os.path.join(args.work, "images")
    csv = build_images(root, args.n)
    print(f"images: {args.n} x 1280x720 JPEG in {time.perf_counter() - t:.0f} s", flush=True)
    res = {"machine": machine(), "n": args.n, "models": {}}
    res["nvjpeg_decode_alone_img_s"] = nvjpeg_alone(root, csv)
    print(f"torchvision nvJPEG batched decode alone (bytes in memory): {res['nvjpeg_decode_alone_img_s']:.0f} img/s",
          flush=True)
    from extract.batch_decode import has_jpeg_engines

    res["jpeg_engines"] = has_jpeg_engines(torch.device("cuda"))
    decoders = [d for d in args.decoders if d != "nvimgcodec" or res["jpeg_engines"]]
    if res["jpeg_engines"]:
        for th in (1, 2, 4):
            r = nvimgcodec_alone(root, csv, threads=th)
            res[f"nvimgcodec_hw_alone_{th}thread_img_s"] = r
            print(f"nvImageCodec hardware engines alone, {th} thread(s): {r:.0f} img/s", flush=True)
        res["decoder_agreement_vs_pil"] = decoder_agreement(root, csv)
        print("decoded pixels vs PIL:", res["decoder_agreement_vs_pil"], flush=True)
    for d in decoders:
        res[f"stages_{d}"] = stage_profile(root, csv, d)
        print(f"[{d}] stages alone: {res[f'stages_{d}']}", flush=True)
        decode_only(root, csv, min(args.n, 4096), decoder=d)  # warm the page cache and the decoder
        res[f"decode_preprocess_only_{d}_img_s"] = dec = decode_only(root, csv, args.n, decoder=d)
        print(f"[{d}] decode + preprocess stage alone: {dec:.0f} img/s", flush=True)
    save(res, args.out)
    for name in args.models:
        md = save_model(name, args.work)
        r: dict = {"ours": {}}
        for d in decoders:
            out = os.path.join(args.work, f"cache-{name}-{d}-{int(time.time())}")
            t = time.perf_counter()
            s = run_extract(ExtractConfig(images=[root], labels=[csv], backbone=f"hf:{md}", out=out, progress=False,
                                          workers=os.cpu_count(), shard_size=8192, decoder=d))
            s["wall_s"] = time.perf_counter() - t
            r["ours"][d] = s
            print(f"[{name}] stage1 extract --decoder {d}: {s['images_per_s']:.0f} img/s files to cache (after a "
                  f"{s['compile_seconds']:.0f} s compile; batch {s['batch_size']}, {s['wall_s']:.0f} s wall)",
                  flush=True)
        best = max(r["ours"], key=lambda d: r["ours"][d]["images_per_s"])
        r["best_decoder"], r["ours_img_s"] = best, r["ours"][best]["images_per_s"]
        # the ceiling is the model's best of the two shapes the run used (its forward's batch and
        # its decoded batch), each launched kernel by kernel and as a CUDA graph
        shapes = sorted({r["ours"][best]["forward_batch"], r["ours"][best]["batch_size"]})
        r["ceiling_by_batch_img_s"] = {f"{b}{' graphs' if m else ''}": ceiling(md, b, mode=m)
                                       for b in shapes for m in (None, "reduce-overhead")}
        r["ceiling_img_s"] = max(r["ceiling_by_batch_img_s"].values())
        print(f"[{name}] model alone, compiled bf16: {r['ceiling_img_s']:.0f} img/s "
              f"(by batch: { {b: round(v) for b, v in r['ceiling_by_batch_img_s'].items()} })", flush=True)
        if not args.skip_baseline:
            r["baseline_img_s"] = baseline(root, csv, md, args.baseline_n)
            print(f"[{name}] baseline (PIL DataLoader x{os.cpu_count()}, eager bf16): {r['baseline_img_s']:.0f} img/s",
                  flush=True)
            r["ours_over_baseline"] = r["ours_img_s"] / r["baseline_img_s"]
        r["ours_over_ceiling"] = r["ours_img_s"] / r["ceiling_img_s"]
        print(f"[{name}] best decoder {best}: (b)/(a) = {r.get('ours_over_baseline', float('nan')):.2f}   "
              f"(b)/(c) = {r['ours_over_ceiling']:.2f}", flush=True)
        res["models"][name] = r
        save(res, args.out)
    print("results:", save(res, args.out))


if __name__ == "__main__":
    main()
