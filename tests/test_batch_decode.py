"""The tensor decode/preprocess path (nvJPEG on a GPU) against the PIL path."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

import extract.batch_decode as bd
from cache.errors import Stage1Error
from extract.batch_decode import BatchPreprocessor, needs_cpu, resolve_batch_decoder
from extract.preprocess import Preprocessing, load_and_preprocess


def _jpegs(digits):
    return sorted(glob.glob(os.path.join(digits["root"], "images", "*.jpg")))


@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
@pytest.mark.parametrize("preset", ["baseline", "hf"])
def test_tensor_path_matches_pil_on_cpu(digits_small, preset, decoder):
    """Both batch decoders run libjpeg-turbo on a CPU device: the wrapper code (header
    parsing, layout, failures, resize/crop) is checked here, the GPU numerics on a GPU."""
    files = _jpegs(digits_small)
    datas = [open(f, "rb").read() for f in files]
    recipe = Preprocessing.from_preset(preset)
    bp = BatchPreprocessor(recipe, torch.device("cpu"), decoder=decoder)
    imgs, cpu = bp.decode(datas)
    # the CMYK, EXIF-rotated and broken JPEGs go to the CPU path, the rest are batch-decoded
    assert {os.path.basename(files[i]) for i in cpu} >= {"broken_truncated.jpg", "broken_not_an_image.jpg"}
    assert needs_cpu(datas[0][: len(datas[0]) // 2])  # truncated: no end-of-image marker
    ok = [i for i in range(len(files)) if i not in cpu]
    assert len(ok) >= len(files) - 5
    x = bp.transform([imgs[i] for i in ok])
    ref = torch.stack([load_and_preprocess(files[i], recipe)[0] for i in ok])
    cos = torch.nn.functional.cosine_similarity(x.flatten(1), ref.flatten(1))
    assert cos.min() > 0.9995
    assert (x - ref).abs().mean() < 0.01


def test_nvimgcodec_decodes_what_pil_decodes(digits_small):
    files = [f for f in _jpegs(digits_small) if not os.path.basename(f).startswith("broken")]
    datas = [bytearray(open(f, "rb").read()) for f in files]
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    flags = [needs_cpu(d) for d in datas]
    imgs = bp._decode_nvimgcodec([d for d, f in zip(datas, flags, strict=True) if not f])
    from PIL import Image

    ref = [f for f, flag in zip(files, flags, strict=True) if not flag]
    assert imgs and all(im is not None for im in imgs)
    assert bp.layout == "hwc"  # nvImageCodec's own layout, no per-image permute
    for im, f in zip(imgs, ref, strict=True):
        pil = torch.from_numpy(np.array(Image.open(f).convert("RGB")))
        assert im.shape == pil.shape and im.dtype == torch.uint8
        assert (im.int() - pil.int()).abs().max() <= 2  # both libjpeg-turbo; PIL may pick another IDCT
    # garbage and truncated data come back as None, never an exception
    out = bp._decode_nvimgcodec([b"not a jpeg", bytes(datas[0][: len(datas[0]) // 3]), datas[0]])
    assert out[0] is None and out[2] is not None


def test_nvimgcodec_decodes_in_chunks_like_one_call(digits_small):
    """``decode_chunk`` splits the batch over several decoder calls: same images, same order."""
    files = [f for f in _jpegs(digits_small) if not os.path.basename(f).startswith("broken")]
    datas = [bytearray(open(f, "rb").read()) for f in files]
    datas = [d for d in datas if not needs_cpu(d)] + [bytearray(b"not a jpeg")]
    whole = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    chunked = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decode_chunk=3)
    a, b = whole._decode_nvimgcodec(datas), chunked._decode_nvimgcodec(datas)
    assert len(a) == len(b) == len(datas) and a[-1] is None and b[-1] is None
    for x, y in zip(a[:-1], b[:-1], strict=True):
        assert torch.equal(x, y)


def test_decoder_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_batch_decoder("auto", cpu) == "pil"
    assert resolve_batch_decoder("pil", cpu) == "pil"
    for name in ("nvjpeg", "nvimgcodec"):
        with pytest.raises(Stage1Error, match=f"--decoder {name} needs a CUDA device; use --decoder pil"):
            resolve_batch_decoder(name, cpu)
    assert not bd.has_jpeg_engines(cpu)
    monkeypatch.setattr(bd, "_NVIMGCODEC", [None])  # as on a machine without nvImageCodec
    with pytest.raises(Stage1Error, match="nvImageCodec is not installed; pip install"):
        resolve_batch_decoder("nvimgcodec", cpu)
    with pytest.raises(Stage1Error, match="not installed"):
        BatchPreprocessor(Preprocessing(), cpu, decoder="nvimgcodec")
    assert resolve_batch_decoder("auto", torch.device("cuda")) in ("nvjpeg",)  # no engines without nvImageCodec


def test_needs_cpu():
    assert needs_cpu(b"\x89PNG....") and needs_cpu(b"not an image")


def test_jpeg_info_reads_the_frame_size():
    import io

    from PIL import Image

    from extract.jpeg_header import jpeg_info

    for h, w, mode, progressive in [(48, 64, "RGB", False), (720, 1280, "RGB", True), (1, 1, "L", False),
                                    (65500, 3, "L", False)]:
        buf = io.BytesIO()
        Image.new(mode, (w, h), 128).save(buf, format="JPEG", progressive=progressive)
        assert jpeg_info(buf.getvalue()) == (False, (h, w))
    assert jpeg_info(b"\x89PNG....") == (True, None)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = b"\x00\x00"  # height 0: to be set by a DNL marker
    assert jpeg_info(data) == (False, None)


def _mixed_jpegs(digits) -> list[bytearray]:
    """The demo's batchable JPEGs and a few more of other sizes, grey and progressive ones too."""
    import io

    from PIL import Image

    datas = _batchable(digits)
    rng = np.random.default_rng(0)
    for h, w, mode, progressive in [(37, 53, "RGB", False), (37, 53, "L", False), (64, 48, "RGB", True),
                                    (37, 53, "RGB", True)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(
            buf, format="JPEG", progressive=progressive)
        datas.insert(int(rng.integers(0, len(datas))), bytearray(buf.getvalue()))
    return datas


def _decode_both_ways(datas, dev, **kw):
    from extract.jpeg_header import jpeg_info

    sizes = [jpeg_info(d)[1] for d in datas]
    got = {}
    for buffered in (False, True):
        bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec", **kw)
        bp.batch_buffers = buffered
        imgs, cpu = bp.decode(datas, sizes=sizes if buffered else None)
        got[buffered] = (imgs, cpu, bp.transform([im for im in imgs if im is not None]))
    return got


def test_batch_buffers_decode_what_nvimgcodec_allocates(digits_small):
    """Decoding into one buffer per image size gives exactly the images (and the resized
    batch) that nvImageCodec's own images give: mixed sizes, grey and progressive JPEGs."""
    datas = _mixed_jpegs(digits_small)
    got = _decode_both_ways(datas, torch.device("cpu"), decode_chunk=7)
    (own, cpu_own, x_own), (buf, cpu_buf, x_buf) = got[False], got[True]
    assert cpu_own == cpu_buf == []
    for a, b in zip(own, buf, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(x_own, x_buf)
    # images of one size share one buffer; nvImageCodec's own images do not
    by_size: dict = {}
    for im in buf:
        by_size.setdefault(tuple(im.shape), set()).add(im.untyped_storage().data_ptr())
    assert len(by_size) >= 3 and all(len(v) == 1 for v in by_size.values())
    assert len({im.untyped_storage().data_ptr() for im in own}) == len(own)


def test_resize_reads_runs_of_one_decode_buffer_in_place():
    """Consecutive images of one decode buffer are resized from the buffer itself (no stacked
    copy); the result equals that of the same images as separate tensors, and a run broken
    by a missing image or taken out of order falls back to stacking."""
    from extract.batch_decode import _consecutive

    g = torch.Generator().manual_seed(0)
    buf = torch.randint(0, 256, (9, 40, 70, 3), dtype=torch.uint8, generator=g)
    views = list(buf.unbind(0))
    assert _consecutive(views[2:6]).data_ptr() == buf[2].data_ptr()
    assert _consecutive(views[2:6]).shape == (4, 40, 70, 3)
    assert _consecutive([views[1], views[3]]) is None and _consecutive(views[3::-1]) is None
    assert _consecutive([v.clone() for v in views[:2]]) is None
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    for pick in (views, views[:4] + views[5:], views[::-1]):
        assert torch.equal(bp.transform(pick, chunk=4), bp.transform([v.clone() for v in pick], chunk=4))


def test_batch_buffers_fall_back_where_a_size_is_unknown_or_wrong(digits_small):
    """Images without a size go to nvImageCodec's own images; a size that misstates the image
    (nvImageCodec refuses a buffer too small) sends the call to them too: same images."""
    datas = _mixed_jpegs(digits_small)[:12]
    ref = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    ref.batch_buffers = False
    want = ref.decode(datas)[0]
    from extract.jpeg_header import jpeg_info

    sizes = [jpeg_info(d)[1] for d in datas]
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    for bad in ([None] + sizes[1:], [(h - 1, w) for h, w in sizes]):
        imgs, cpu = bp.decode(datas, cpu=[False] * len(datas), sizes=bad)
        assert cpu == [] and all(torch.equal(a, b) for a, b in zip(imgs, want, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_gpu_features_agree_with_cpu(digits_small, tiny_hf, tmp_path, decoder):
    from cache import open_cache
    from extract.run import ExtractConfig, run_extract

    common = dict(images=[digits_small["root"]], labels=[digits_small["train"]], backbone=tiny_hf, progress=False,
                  max_failures="20%", workers=2)
    run_extract(ExtractConfig(out=str(tmp_path / "cpu"), device="cpu", **common))
    s = run_extract(ExtractConfig(out=str(tmp_path / "gpu"), device="cuda", decoder=decoder, **common))
    assert s["decoder"] == decoder
    with open_cache(str(tmp_path / "cpu")) as a, open_cache(str(tmp_path / "gpu")) as b:
        assert a.fingerprint != b.fingerprint  # the decoder is part of the recipe
        assert a.paths.tolist() == b.paths.tolist(), sorted(set(a.paths) ^ set(b.paths))
        assert sorted(f["path"] for f in a.failures) == sorted(f["path"] for f in b.failures)
        for s in ("cls", "patch_mean"):
            fa, fb = torch.from_numpy(a.features(s)), torch.from_numpy(b.features(s))
            cos = torch.nn.functional.cosine_similarity(fa, fb)
            print(f"{s}: min cosine GPU vs CPU path {float(cos.min()):.6f}")
            assert cos.min() >= 0.999, float(cos.min())


@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_pipeline_batches_in_order_with_failures(digits_small, decoder):
    """The overlapped batch producer (run on the CPU here) keeps order and records failures."""
    from extract.pipeline import gpu_batches
    from extract.sources import build_input_list

    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    recipe = Preprocessing()
    batches = [list(range(s, min(s + 5, len(il.items)))) for s in range(0, len(il.items), 5)]
    seen, fails = [], []
    for idx, x, shas, failed in gpu_batches(il.items, batches, recipe, torch.device("cpu"), decoder=decoder,
                                            threads=3, decoders=2, prefetch=2):
        assert x is None or x.shape == (len(idx), 3, 224, 224)
        assert len(shas) == len(idx)
        seen += idx
        fails += [i for i, _ in failed]
        if idx:
            ref = load_and_preprocess(il.items[idx[0]].file, recipe)[0]
            cos = torch.nn.functional.cosine_similarity(x[0].flatten(), ref.flatten(), dim=0)
            assert cos > 0.999
    assert sorted(seen + fails) == list(range(len(il.items)))
    assert seen == sorted(seen)
    assert {os.path.basename(il.items[i].path) for i in fails} == {
        "broken_truncated.jpg", "broken_not_an_image.jpg", "broken_empty.png"}


def test_pipeline_prepares_the_first_batch_alone(digits_small):
    """No other batch starts decoding before the first is decoded (it has the decoders to
    itself); the batches are the same either way; a first batch that fails is reported,
    not waited for."""
    import threading
    import time

    from extract.pipeline import gpu_batches
    from extract.sources import build_input_list

    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    good = [i for i, it in enumerate(il.items) if not needs_cpu(open(it.file, "rb").read())]
    batches = [good[s:s + 4] for s in range(0, 16, 4)]
    first = bytes(open(il.items[batches[0][0]].file, "rb").read())

    class Slow(BatchPreprocessor):
        calls: list = []

        def decode(self, datas, **k):
            t = time.perf_counter()
            time.sleep(0.05)
            out = super().decode(datas, **k)
            self.calls.append((bytes(datas[0]) == first, t, time.perf_counter(), threading.current_thread().name))
            return out

    def run(first_alone):
        bp = Slow(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
        bp.calls = []
        got = [(idx, shas) for idx, _, shas, _ in gpu_batches(
            il.items, batches, Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", readers=2, threads=2,
            decoders=4, prefetch=4, preprocessor=bp, first_alone=first_alone)]
        return got, bp.calls

    got, calls = run(True)
    (end0,) = [end for is_first, _, end, _ in calls if is_first]
    assert len(calls) == 4 and all(start >= end0 for is_first, start, _, _ in calls if not is_first)
    assert got == run(False)[0] and [idx for idx, _ in got] == batches

    class Broken(BatchPreprocessor):
        def decode(self, datas, **k):
            if bytes(datas[0]) == first:
                raise RuntimeError("the first batch fails")
            return super().decode(datas, **k)

    with pytest.raises(RuntimeError, match="the first batch fails"):
        list(gpu_batches(il.items, batches, Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", readers=2,
                         threads=2, decoders=4, prefetch=4, first_alone=True,
                         preprocessor=Broken(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")))


def test_decoder_pool_hands_free_decoders_to_the_earliest_batch_waiting():
    """Threads that asked for a decoder in the order 5, 1, 3, 1 (priorities) get one in the
    order 1, 1, 3, 5: the batch the model needs next is decoded first."""
    import threading
    import time

    from extract.batch_decode import DecoderPool

    pool = DecoderPool()
    pool.put("d")
    held = pool.get(0)
    got, lock = [], threading.Lock()

    def ask(p: float, name: str) -> None:
        d = pool.get(p)
        with lock:
            got.append(name)
        time.sleep(0.01)
        pool.put(d)

    threads = []
    for p, name in ((5, "five"), (1, "one-a"), (3, "three"), (1, "one-b")):
        threads.append(threading.Thread(target=ask, args=(p, name)))
        threads[-1].start()
        time.sleep(0.05)  # each is waiting before the next asks
    assert got == []  # nothing free yet
    pool.put(held)
    for th in threads:
        th.join(5)
    assert got == ["one-a", "one-b", "three", "five"]
    # two decoders freed together go to both waiters, neither left waiting
    pool2, got2 = DecoderPool(), []
    waiters = [threading.Thread(target=lambda p=p: got2.append(pool2.get(p))) for p in (2, 1)]
    for th in waiters:
        th.start()
    time.sleep(0.05)
    pool2.put("x")
    pool2.put("y")
    for th in waiters:
        th.join(5)
    assert sorted(got2) == ["x", "y"] and not any(th.is_alive() for th in waiters)


def _decoder_order(digits_small, batch_order: bool) -> list[int]:
    """Batch indices in the order they got the one decoder, when batch 0 reaches it first
    and batch 1 after batches 2 and 3 (all while batch 0 holds it)."""
    import threading
    import time

    from extract.pipeline import gpu_batches
    from extract.sources import build_input_list

    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    good = [i for i, it in enumerate(il.items) if not needs_cpu(open(it.file, "rb").read())]
    batches = [good[s:s + 2] for s in range(0, 8, 2)]
    index_of = {bytes(open(il.items[b[0]].file, "rb").read()): k for k, b in enumerate(batches)}
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decoders=1)
    bp.batch_order = batch_order
    bp.warm_up()

    class Slow:  # holds the decoder long enough for the others to queue
        def __init__(self, dec):
            self.dec = dec

        def decode(self, streams, **k):
            time.sleep(0.3)
            return self.dec.decode(streams, **k)

    bp._nv_free.put(Slow(bp._nv_free.get()))
    real_decode, real_take = bp.decode, bp._take_decoder
    took, lock = [], threading.Lock()

    def decode(datas, **k):
        # batch 0 asks for the decoder first, batch 1 after batches 2 and 3
        time.sleep({0: 0.0, 1: 0.15, 2: 0.05, 3: 0.05}[index_of[bytes(datas[0])]])
        return real_decode(datas, **k)

    def take():
        d = real_take()
        with lock:
            took.append(bp._local.priority)
        return d

    bp.decode, bp._take_decoder = decode, take
    got = [idx for idx, _, _, _ in gpu_batches(il.items, batches, Preprocessing(), torch.device("cpu"),
                                                 decoder="nvimgcodec", readers=2, threads=2, decoders=4,
                                                 prefetch=4, preprocessor=bp)]
    assert got == batches
    return [int(p) for p in took]


def test_pipeline_hands_the_decoder_to_batches_in_order(digits_small):
    """With one decoder and four decode threads, the batches get the decoder in the order
    the model takes them, even when a later batch asks for it first; first come, first
    served (``batch_order=False``) would serve batches 2 and 3 before 1."""
    assert _decoder_order(digits_small, True) == [0, 1, 2, 3]


def test_pipeline_uses_a_reader_pool_it_is_given_and_leaves_it_open(digits_small):
    """`run_extract` starts the reader processes before loading the model (a small process
    forks fast) and hands the pool to the pipeline, which must use it and not close it."""
    from extract.pipeline import gpu_batches
    from extract.readers import ReaderPool
    from extract.sources import build_input_list

    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    batches = [list(range(s, min(s + 7, len(il.items)))) for s in range(0, len(il.items), 7)]
    run = lambda readers: [(idx, shas, failed) for idx, _, shas, failed in gpu_batches(  # noqa: E731
        il.items, batches, Preprocessing(), torch.device("cpu"), decoder="nvjpeg", readers=readers, threads=2)]
    pool = ReaderPool(2, threads=2)
    try:
        assert run(pool) == run(2)
        assert pool.result(pool.submit([il.items[0].file]))[0].reason is None  # still open
        if pool.uses_processes:
            assert all(p.is_alive() for p in pool.procs)
    finally:
        pool.close()


@pytest.mark.parametrize("preset", ["baseline", "hf"])
def test_gemm_resize_reproduces_pil(preset):
    """The GEMM resize (float32 on a CPU) gives PIL's 8-bit pixels: off by one level at
    most, on a few samples (float vs PIL's 22-bit integer sums), on odd sizes and aspect
    ratios, with both of Pillow's pass orders."""
    from PIL import Image
    from torchvision.transforms import v2 as T
    from torchvision.transforms.functional import InterpolationMode

    rng = np.random.default_rng(0)
    r = Preprocessing.from_preset(preset)
    bp = BatchPreprocessor(r, torch.device("cpu"))
    mean, std = torch.tensor(r.mean).view(3, 1, 1), torch.tensor(r.std).view(3, 1, 1)
    size = r.resize if preset == "baseline" else (r.resize, r.resize)
    ops = [T.Resize(size, interpolation=InterpolationMode(r.interpolation), antialias=True)]
    ops += [T.CenterCrop(r.crop)] if r.crop else []
    pil = T.Compose(ops)
    shapes = [(720, 1280), (300, 200), (1000, 257), (180, 900), (256, 300), (224, 224), (517, 389)]
    imgs = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in shapes]
    x = bp.transform([torch.from_numpy(a).permute(2, 0, 1) for a in imgs], chunk=2)
    for a, got in zip(imgs, x, strict=True):
        ref = np.asarray(pil(Image.fromarray(a))).astype(int)
        got = ((got * std + mean) * 255).round().permute(1, 2, 0).numpy().astype(int)
        d = np.abs(got - ref)
        assert d.max() <= 1 and (d > 0).mean() < 0.03, (a.shape, d.max(), (d > 0).mean())


def test_resize_of_whole_hwc_images_equals_the_resize_of_chw_views():
    """(H, W, 3) images (nvImageCodec's layout) are stacked whole and cropped as one batch,
    in pieces of at most STACK_BYTES: the same output, bit for bit, as per-image (3, H, W)
    slices, for groups of several sizes."""
    rng = np.random.default_rng(1)
    shapes = [(720, 1280)] * 5 + [(300, 200)] * 3 + [(517, 389), (720, 1280)]
    hwc = [torch.from_numpy((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in shapes]
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    assert bp.layout == "hwc" and bp.chw(hwc[0]).shape == (3, 720, 1280)
    ref = bp.transform([im.permute(2, 0, 1) for im in hwc], layout="chw")
    bp.STACK_BYTES = 2 * 720 * 1280 * 3  # two of the large images at a time
    assert torch.equal(bp.transform(hwc), ref)
    bp.hwc_views = False
    assert bp.layout == "chw" and torch.equal(bp.transform([im.permute(2, 0, 1) for im in hwc]), ref)


def test_resume_of_a_gpu_decoded_cache_on_a_cpu_is_refused(digits_small, tiny_hf, tmp_path):
    import json

    from extract.run import ExtractConfig, run_extract

    out = tmp_path / "c"
    out.mkdir()
    (out / "extract.json").write_text(json.dumps({"provenance": {"preprocessing": {"decoder": "nvimgcodec"}}}))
    with pytest.raises(Stage1Error, match="started with --decoder nvimgcodec, which needs a CUDA device"):
        run_extract(ExtractConfig(images=[digits_small["root"]], labels=[digits_small["train"]], backbone=tiny_hf,
                                  out=str(out), device="cpu", progress=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvimgcodec_on_gpu_decodes_progressive_and_baseline_jpegs(digits_small):
    """The batch goes to the JPEG engines alone where there are some; what they refuse
    (progressive files, on engines that take only baseline ones) goes to a decoder that may
    use the CUDA decoder too, else to the per-image CPU path: no file is lost, and what is
    decoded on the GPU is close to PIL's pixels."""
    import io

    from PIL import Image

    bd.nvimgcodec() or pytest.skip("nvImageCodec not installed")
    files = [f for f in _jpegs(digits_small) if not os.path.basename(f).startswith("broken")]
    pils, datas = [], []
    for k, f in enumerate(files[:12]):
        im = Image.open(f).convert("RGB").resize((320, 240))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90, progressive=bool(k % 2))
        datas.append(bytearray(buf.getvalue()))
        pils.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1))
    bp = BatchPreprocessor(Preprocessing(), torch.device("cuda"), decoder="nvimgcodec")
    imgs, cpu = bp.decode(datas)
    print(f"engines: {bp._nv_engines}; second decoder: {bp._nv_fallback}; to the CPU: {cpu}")
    assert all((imgs[i] is None) == (i in cpu) for i in range(len(datas)))
    assert all(imgs[i] is not None for i in range(0, len(datas), 2))  # the baseline JPEGs
    for im, ref in zip(imgs, pils, strict=True):
        if im is not None:
            im = bp.chw(im)
            diff = (im.cpu().int() - ref.int()).abs().float()
            assert im.shape == ref.shape and diff.mean() < 1.5, float(diff.mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_buffers_on_gpu_decode_what_nvimgcodec_allocates(digits_small):
    """On a GPU (the JPEG engines where it has them, the CUDA decoder for progressive files):
    the images decoded into one buffer per size equal nvImageCodec's own, bit for bit."""
    bd.nvimgcodec() or pytest.skip("nvImageCodec not installed")
    datas = _mixed_jpegs(digits_small)
    got = _decode_both_ways(datas, torch.device("cuda"), decode_chunk=7)
    (own, cpu_own, x_own), (buf, cpu_buf, x_buf) = got[False], got[True]
    assert cpu_own == cpu_buf
    for a, b in zip(own, buf, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(x_own, x_buf)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_stream_gives_the_same_batches_as_one_stream(digits_small):
    """Decoding on a stream of its own (images held until the resize that reads them is done)
    gives, batch after batch, exactly what decoding on the current stream gives, also with
    other work queued on the GPU between batches."""
    bd.nvimgcodec() or pytest.skip("nvImageCodec not installed")
    files = [f for f in _jpegs(digits_small) if not os.path.basename(f).startswith("broken")]
    datas = [d for d in (bytearray(open(f, "rb").read()) for f in files) if not needs_cpu(d)]
    dev = torch.device("cuda")
    side = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec", decode_chunk=5)
    same = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec", decode_stream=False)
    busy = torch.randn(4096, 4096, device=dev)
    for k in range(6):
        batch = datas[k % 3::3]
        a = same.transform([im for im in same.decode(batch)[0] if im is not None])
        for _ in range(20):  # keep the SMs busy while the next batch is decoded
            busy = busy @ busy / 64
        b = side.transform([im for im in side.decode(batch)[0] if im is not None])
        assert torch.equal(a, b)
    assert len(side._local.held) <= 3


def test_warm_up_makes_the_decoder_once():
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    assert bp._nv_decoder is None
    bp.warm_up()
    made = bp._nv_decoder
    assert made is not None and bp._nv_engines is False  # no engines on a CPU
    bp.warm_up()
    bp._decode_nvimgcodec([b"not a jpeg"])
    assert bp._nv_decoder is made
    BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvjpeg").warm_up()  # nothing to make


def test_decoders_preallocate_for_the_warm_up_sample(digits_small, monkeypatch):
    """Given a sample, the decoders are made with the JPEG engines' memory pool sized for its
    width and height (nvImageCodec's ``nvjpeg_hw_decoder:preallocate_*`` options, which its
    CPU backend ignores); without one, or with ``preallocate=False``, with no hint."""
    import io

    from PIL import Image

    sample = bytes(_batchable(digits_small)[0])
    w, h = Image.open(io.BytesIO(sample)).size
    seen = []
    real = bd._make_nvimgcodec_decoder

    def make(device, **k):
        seen.append(k.get("options", ""))
        return real(device, **k)

    monkeypatch.setattr(bd, "_make_nvimgcodec_decoder", make)
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decoders=2)
    bp.warm_up(sample, decode=False)
    assert len(seen) == 2 and all(o == seen[0] for o in seen)
    opts = dict(t.split(":", 1)[1].split("=") for t in seen[0].split())
    assert opts == {"preallocate_width_hint": str(w), "preallocate_height_hint": str(h), "preallocate_batch_size": "1"}
    assert all(t.startswith("nvjpeg_hw_decoder:") for t in seen[0].split())
    assert not bp._mats  # decode=False: the decoders only
    assert bp.decode([sample])[0][0] is not None  # a decoder made with the options decodes
    for kw, arg in (({}, None), ({"preallocate": False}, sample), ({}, b"not a jpeg"), ({"big": True}, sample)):
        seen.clear()
        other = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec",
                                  **{k: v for k, v in kw.items() if k != "big"})
        if kw.get("big"):  # a first image larger than the bound sizes no pool
            other.PREALLOCATE_PIXELS = w * h - 1
        other.warm_up(arg)
        assert seen and all(o == "" for o in seen)


def test_engine_share_splits_each_batch_between_the_engines_and_the_cuda_decoder(monkeypatch):
    """On a GPU, ``engine_share`` below 1 becomes the engines' backend load hint, with
    nvImageCodec's CUDA decoder behind them for the rest (checked on a stand-in module: the
    backends a decoder is made with)."""
    import types

    made = []

    class Backend:
        def __init__(self, kind, load_hint=1.0):
            self.kind, self.load_hint = kind, load_hint

    fake = types.SimpleNamespace(
        Backend=Backend, BackendKind=types.SimpleNamespace(HW_GPU_ONLY="hw", GPU_ONLY="cuda", CPU_ONLY="cpu"),
        NVIMGCODEC_DEVICE_CPU_ONLY=-99,
        Decoder=lambda **k: made.append((k["device_id"], [(b.kind, b.load_hint) for b in k["backends"]])))
    monkeypatch.setattr(bd, "_NVIMGCODEC", [fake])
    gpu = torch.device("cuda", 1)
    for kw, want in (({"kind": "hardware"}, [("hw", 1.0)]),
                     ({"kind": "any"}, [("hw", 1.0), ("cuda", 1.0)]),
                     ({"kind": "hardware", "engine_share": 0.8}, [("hw", 0.8), ("cuda", 1.0)]),
                     ({"kind": "any", "engine_share": 0.7}, [("hw", 0.7), ("cuda", 1.0)])):
        made.clear()
        bd._make_nvimgcodec_decoder(gpu, **kw)
        assert made == [(1, want)], kw
    made.clear()
    bd._make_nvimgcodec_decoder(torch.device("cpu"), engine_share=0.5)  # no engines on a CPU
    assert made == [(-99, [("cpu", 1.0)])]


def _batchable(digits) -> list[bytearray]:
    """The demo JPEGs the batch decoder takes (not broken, not CMYK or EXIF-rotated)."""
    files = [f for f in _jpegs(digits) if not os.path.basename(f).startswith("broken")]
    return [d for d in (bytearray(open(f, "rb").read()) for f in files) if not needs_cpu(d)]


def _watch_decoders(bp: BatchPreprocessor) -> dict[int, list[int]]:
    """Wrap the decoders in ``bp``'s pool: returns {decoder: [images per call]}, filled as
    they decode; a decoder used by two threads at once fails the call."""
    import threading

    users: dict[int, list[int]] = {}
    busy: set[int] = set()
    lock = threading.Lock()

    class Watched:
        def __init__(self, dec):
            self.dec = dec

        def decode(self, *a, **k):
            with lock:
                assert id(self) not in busy
                busy.add(id(self))
                users.setdefault(id(self), []).append(len(a[0]))
            try:
                return self.dec.decode(*a, **k)
            finally:
                with lock:
                    busy.discard(id(self))

    watched = []
    while not bp._nv_free.empty():
        watched.append(Watched(bp._nv_free.get()))
    for w in watched:
        bp._nv_free.put(w)
    assert len(watched) == bp.decoders
    return users


def test_threads_share_a_pool_of_decoders(digits_small):
    """Threads decoding through one instance take whichever of its decoders is free: every
    decoder gets used, none by two threads at once, and the images are those one decoder gives."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    datas = _batchable(digits_small)
    one = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decoders=1)
    ref = one._decode_nvimgcodec(datas)
    pool = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decoders=2)
    pool.warm_up()
    barrier = threading.Barrier(2)
    users = _watch_decoders(pool)

    def run(_):
        barrier.wait()  # both threads start together: the second must take the other decoder
        return pool._decode_nvimgcodec(datas)

    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(run, range(2)))
    assert len(users) == 2
    for out in outs:
        assert len(out) == len(ref)
        for x, y in zip(out, ref, strict=True):
            assert torch.equal(x, y)


def test_warm_up_with_a_sample_tries_every_decoder_and_the_resize(digits_small):
    sample = bytes(_batchable(digits_small)[0])
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec", decoders=2)
    bp.warm_up()
    users = _watch_decoders(bp)
    assert not users and not bp._mats
    bp.warm_up(sample, copies=3)
    assert len(users) == 2 and all(3 in calls for calls in users.values())  # each decoder, 3 copies
    h, w = bp.chw(bp.decode([sample])[0][0]).shape[-2:]
    assert {h, w} <= {k[0] for k in bp._mats}  # the resize for the sample's size is ready
    # a large sample gets fewer copies (here: room for 2 of its size)
    users.clear()
    bp.WARM_UP_PIXELS = 2 * h * w + 1
    bp.warm_up(sample, copies=32)
    assert max(n for calls in users.values() for n in calls) == 2
    # a sample the batch decoder does not take is left alone
    other = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    other.warm_up(b"not a jpeg")
    assert other._nv_decoder is not None and not other._mats


def test_engines_probe_runs_once_per_device(monkeypatch):
    calls = []
    monkeypatch.setattr(bd, "_ENGINES", {})
    monkeypatch.setattr(bd, "_probe_jpeg_engines", lambda dev: calls.append(dev.index) or dev.index == 1)
    if bd.nvimgcodec() is None:
        pytest.skip("nvImageCodec not installed")
    for _ in range(3):
        assert bd.has_jpeg_engines(torch.device("cuda", 0)) is False
        assert bd.has_jpeg_engines(torch.device("cuda", 1)) is True
    assert calls == [0, 1]
    assert bd.has_jpeg_engines(torch.device("cpu")) is False and calls == [0, 1]


def test_extract_makes_the_batch_decoder_while_the_model_is_prepared(digits_small, tiny_hf, tmp_path, monkeypatch):
    """`run_extract` with a batch decoder makes it (and tries it on the first input) in a
    helper thread before the model is moved and compiled, and hands that preprocessor to the pipeline (run here on the CPU
    with nvImageCodec's CPU backend, the decoder choice forced)."""
    import threading
    import time

    import extract.run as run_mod
    from cache import open_cache

    calls = []
    real = BatchPreprocessor.warm_up

    def warm_up(self, sample=None, **k):
        calls.append((threading.current_thread().name, id(self), bool(sample)))
        real(self, sample, **k)

    made = []
    real_init = BatchPreprocessor.__init__

    def init(self, *a, **k):
        made.append(id(self))
        real_init(self, *a, **k)

    decodes = []
    real_decode = BatchPreprocessor.decode

    def decode(self, datas, **k):
        t = time.perf_counter()
        try:
            return real_decode(self, datas, **k)
        finally:
            decodes.append((threading.current_thread().name, t, time.perf_counter()))

    monkeypatch.setattr(BatchPreprocessor, "warm_up", warm_up)
    monkeypatch.setattr(BatchPreprocessor, "__init__", init)
    monkeypatch.setattr(BatchPreprocessor, "decode", decode)
    monkeypatch.setattr(run_mod, "_choose_decoder", lambda cfg, device: "nvimgcodec")
    s = run_mod.run_extract(run_mod.ExtractConfig(images=[digits_small["root"]], labels=[digits_small["train"]],
                                                  backbone=tiny_hf, out=str(tmp_path / "c"), device="cpu",
                                                  progress=False, workers=0))
    assert s["decoder"] == "nvimgcodec" and s["rows_written"] + s["failures"] == s["inputs"]
    assert len(made) == 1  # the pipeline used the preprocessor made early
    # the decoders made for, then tried on, the first input's bytes
    assert [c for c in calls if c[0] == "stage1-decoder"] == [("stage1-decoder", made[0], True)] * 2
    # ... and that trial is over before the batches start
    trial = [end for name, _, end in decodes if name == "stage1-decoder"]
    batches = [start for name, start, _ in decodes if name.startswith("stage1-decode_")]
    assert trial and batches and max(trial) <= min(batches)
    with open_cache(str(tmp_path / "c")) as c:
        assert len(c) == s["rows_written"] and np.isfinite(c.features("cls")).all()


def test_pool_helpers_do_nothing_without_a_cuda_driver(monkeypatch):
    """On a CPU, or where the CUDA driver library cannot be loaded, the memory-pool helpers
    answer None/False and change nothing."""
    import ctypes

    import extract.mempool as mp

    cpu = torch.device("cpu")
    assert mp.release_threshold(cpu) is None and mp.reserved_bytes(cpu) is None
    assert mp.keep_pool_memory(cpu) is False
    mp.trim_pool(cpu)

    def no_driver(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(mp, "_lib", [])
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    cuda = torch.device("cuda", 0)
    assert mp.keep_pool_memory(cuda) is False and mp.release_threshold(cuda) is None
    mp.trim_pool(cuda)
    assert mp._lib == [None]


class _FakeDriver:
    """The few CUDA driver calls of extract.mempool, on one pool, in Python."""

    def __init__(self) -> None:
        self.attrs = {4: 0, 5: 123}  # release threshold, reserved bytes
        self.trims: list[int] = []

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, ref, ordinal):
        ref._obj.value = ordinal
        return 0

    def cuDeviceGetMemPool(self, ref, dev):
        ref._obj.value = 0x1000 + dev.value
        return 0

    def cuMemPoolGetAttribute(self, pool, attr, ref):
        ref._obj.value = self.attrs[attr]
        return 0

    def cuMemPoolSetAttribute(self, pool, attr, ref):
        self.attrs[attr] = ref._obj.value
        return 0

    def cuMemPoolTrimTo(self, pool, keep):
        self.trims.append(keep.value)
        return 0


def test_pool_keeps_memory_until_trimmed_then_gets_its_threshold_back(monkeypatch):
    import extract.mempool as mp

    drv = _FakeDriver()
    monkeypatch.setattr(mp, "_lib", [drv])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    dev = torch.device("cuda", 0)
    drv.attrs[4] = 5_000
    assert mp.release_threshold(dev) == 5_000 and mp.reserved_bytes(dev) == 123
    assert mp.keep_pool_memory(dev) and mp.keep_pool_memory(dev)  # twice: the first value is kept
    assert mp.release_threshold(dev) == 2**64 - 1
    mp.trim_pool(dev)
    assert mp.release_threshold(dev) == 5_000 and drv.trims == [0]
    mp.trim_pool(dev)  # nothing to restore: trims only
    assert mp.release_threshold(dev) == 5_000 and drv.trims == [0, 0]


def test_pipeline_keeps_the_pool_while_decoding_and_trims_it_after(digits_small, monkeypatch):
    """The nvImageCodec preprocessor asks the pool to keep memory when it makes its
    decoders; the pipeline trims it when it ends (recorded here on the CPU)."""
    import extract.pipeline as pl
    from extract.sources import build_input_list

    calls = []
    monkeypatch.setattr(bd, "keep_pool_memory", lambda device: calls.append(("keep", device.type)) or False)
    monkeypatch.setattr(pl, "trim_pool", lambda device: calls.append(("trim", device.type)))
    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    batches = [list(range(s, min(s + 8, len(il.items)))) for s in range(0, len(il.items), 8)]
    for _ in pl.gpu_batches(il.items, batches, Preprocessing(), torch.device("cpu"), decoder="nvimgcodec",
                            readers=2, prefetch=2):
        assert calls == [("keep", "cpu")]
    assert calls == [("keep", "cpu"), ("trim", "cpu")]
    bp = BatchPreprocessor(Preprocessing(), torch.device("cpu"), decoder="nvimgcodec")
    bp.keep_pool = False
    calls.clear()
    list(pl.gpu_batches(il.items, batches[:1], Preprocessing(), torch.device("cpu"), decoder="nvimgcodec",
                        readers=2, preprocessor=bp))
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoded_images_memory_is_kept_by_the_pool_while_decoding_and_given_back_after(digits_small):
    """nvImageCodec allocates each decoded image from CUDA's memory pool: the decoders make
    the pool keep that memory between batches, and the pipeline gives it back at its end."""
    bd.nvimgcodec() or pytest.skip("nvImageCodec not installed")
    import extract.mempool as mp
    from extract.pipeline import gpu_batches
    from extract.sources import build_input_list

    dev = torch.device("cuda", 0)
    assert mp.set_release_threshold(dev, 0)
    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    batches = [list(range(s, min(s + 8, len(il.items)))) for s in range(0, len(il.items), 8)]
    bp = BatchPreprocessor(Preprocessing(), dev, decoder="nvimgcodec")
    kept, held = [], []
    for _ in gpu_batches(il.items, batches, Preprocessing(), dev, decoder="nvimgcodec", preprocessor=bp):
        kept.append(mp.release_threshold(dev))
        held.append(mp.reserved_bytes(dev))
    assert kept and all(k == 2**64 - 1 for k in kept)
    assert max(held) > 0 and mp.reserved_bytes(dev) < max(held), (held, mp.reserved_bytes(dev))
    assert mp.release_threshold(dev) == 0  # as before the pipeline


@pytest.mark.parametrize("preset", ["baseline", "hf"])
def test_resize_support_padded_to_aligned_widths_changes_nothing(preset):
    """Each resize axis reads a multiple of 8 input samples (zero weights past the filter's
    support, so the GEMM operands' rows are 16-byte aligned), where the image is that wide;
    the output is exactly that of the unpadded support."""
    bp = BatchPreprocessor(Preprocessing.from_preset(preset), torch.device("cpu"), decoder="nvimgcodec")
    ref = BatchPreprocessor(Preprocessing.from_preset(preset), torch.device("cpu"), decoder="nvimgcodec")
    ref.ALIGN = 1
    g = torch.Generator().manual_seed(0)
    for h, w in [(720, 1280), (37, 53), (300, 301), (230, 227), (64, 48), (3, 9)]:
        for n_in, n_out in [(h, 256), (w, 227)]:
            m, a, b = bp._axis(n_in, n_out)
            m1, a1, b1 = ref._axis(n_in, n_out)
            if m is None:  # not resized along this axis: a plain crop
                assert m1 is None and (a, b) == (a1, b1)
                continue
            assert a <= a1 and b >= b1 and ((b - a) % 8 == 0 or (a, b) == (0, n_in))
            assert torch.equal(m[:, a1 - a:b1 - a], m1) and not m[:, :a1 - a].any() and not m[:, b1 - a:].any()
        ims = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for _ in range(3)]
        assert torch.equal(bp.transform(ims), ref.transform(ims))
