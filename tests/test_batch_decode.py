"""The tensor decode/preprocess path (nvJPEG on a GPU) against the PIL path."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from extract.batch_decode import BatchPreprocessor, needs_cpu
from extract.preprocess import Preprocessing, load_and_preprocess


def _jpegs(digits):
    return sorted(glob.glob(os.path.join(digits["root"], "images", "*.jpg")))


@pytest.mark.parametrize("preset", ["baseline", "hf"])
def test_tensor_path_matches_pil_on_cpu(digits_small, preset):
    files = _jpegs(digits_small)
    datas = [open(f, "rb").read() for f in files]
    recipe = Preprocessing.from_preset(preset)
    bp = BatchPreprocessor(recipe, torch.device("cpu"))
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


def test_needs_cpu():
    assert needs_cpu(b"\x89PNG....") and needs_cpu(b"not an image")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_features_agree_with_cpu(digits_small, tiny_hf, tmp_path):
    from cache import open_cache
    from extract.run import ExtractConfig, run_extract

    common = dict(images=[digits_small["root"]], labels=[digits_small["train"]], backbone=tiny_hf, progress=False,
                  max_failures="20%", workers=2)
    run_extract(ExtractConfig(out=str(tmp_path / "cpu"), device="cpu", **common))
    run_extract(ExtractConfig(out=str(tmp_path / "gpu"), device="cuda", **common))
    with open_cache(str(tmp_path / "cpu")) as a, open_cache(str(tmp_path / "gpu")) as b:
        assert a.fingerprint != b.fingerprint  # the decoder is part of the recipe
        assert a.paths.tolist() == b.paths.tolist(), sorted(set(a.paths) ^ set(b.paths))
        assert sorted(f["path"] for f in a.failures) == sorted(f["path"] for f in b.failures)
        for s in ("cls", "patch_mean"):
            fa, fb = torch.from_numpy(a.features(s)), torch.from_numpy(b.features(s))
            cos = torch.nn.functional.cosine_similarity(fa, fb)
            print(f"{s}: min cosine GPU vs CPU path {float(cos.min()):.6f}")
            assert cos.min() >= 0.999, float(cos.min())


def test_pipeline_batches_in_order_with_failures(digits_small):
    """The overlapped batch producer (run on the CPU here) keeps order and records failures."""
    from extract.pipeline import gpu_batches
    from extract.sources import build_input_list

    il = build_input_list([digits_small["root"]], [digits_small["train"]])
    recipe = Preprocessing()
    batches = [list(range(s, min(s + 5, len(il.items)))) for s in range(0, len(il.items), 5)]
    seen, fails = [], []
    for idx, x, shas, failed in gpu_batches(il.items, batches, recipe, torch.device("cpu"), threads=3, decoders=2,
                                            prefetch=2):
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
