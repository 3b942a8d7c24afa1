"""`extract` end to end: correct features, odd/broken images, resume after SIGKILL, no mixing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cache import Stage1Error, open_cache
from cache.tools import verify_cache
from extract.backbone import load_backbone
from extract.preprocess import Preprocessing, load_and_preprocess
from extract.run import ExtractConfig, run_extract
from tests.conftest import REPO


def _cfg(digits, spec, out, **kw):
    base = dict(images=[digits["root"]], labels=[digits["train"]], backbone=spec, out=str(out), workers=0,
                batch_size=8, shard_size=16, progress=False, dtype="float32")
    return ExtractConfig(**{**base, **kw})


@pytest.mark.parametrize("which", ["tiny_hf", "tiny_timm"])
def test_features_equal_direct_call(digits_small, tmp_path, which, request):
    spec = request.getfixturevalue(which)
    s = run_extract(_cfg(digits_small, spec, tmp_path / "c"))
    assert s["failures"] == 3 and s["failure_reasons"]  # the three broken files
    bb = load_backbone(spec)
    recipe = Preprocessing()
    with open_cache(str(tmp_path / "c")) as c:
        assert len(c) + 3 == s["inputs"]
        assert {f["path"] for f in c.failures} == {"images/broken_truncated.jpg", "images/broken_not_an_image.jpg",
                                                   "images/broken_empty.png"}
        rows = [0, 5, len(c) - 1]
        x = torch.stack([load_and_preprocess(os.path.join(digits_small["root"], c.paths[r]), recipe)[0] for r in rows])
        with torch.inference_mode():
            want = bb(x)
        for name in ("cls", "patch_mean"):
            np.testing.assert_allclose(c.features(name)[rows], want[name].numpy(), rtol=1e-4, atol=1e-5)
        assert c.provenance["preprocessing"]["resize"] == 256 and c.provenance["backbone"]["library"] in ("hf", "timm")
    assert verify_cache(str(tmp_path / "c")) == []


def test_labels_paths_hashes_carried(digits_small, tmp_path, tiny_hf):
    import hashlib

    run_extract(_cfg(digits_small, tiny_hf, tmp_path / "c"))
    listed = [line.split(",") for line in open(digits_small["train"]).read().split()]
    with open_cache(str(tmp_path / "c")) as c:
        by_path = dict(zip(c.paths.tolist(), c.labels.tolist(), strict=True))
        for p, lab in listed:
            if "broken" not in p:
                assert by_path[p] == int(lab)
        p0 = os.path.join(digits_small["root"], c.paths[0])
        assert c.sha256[0] == hashlib.sha256(open(p0, "rb").read()).hexdigest()
        assert c.group[0] == c.sha256[0]  # no group column: grouped by content
        assert np.all(np.diff(c.index) > 0)


def test_rerun_skips_and_other_backbone_refused(digits_small, tmp_path, tiny_hf, tiny_timm):
    out = tmp_path / "c"
    first = run_extract(_cfg(digits_small, tiny_hf, out))
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".h5")}
    assert 0 <= first["first_batch_seconds"] <= first["seconds"]
    again = run_extract(_cfg(digits_small, tiny_hf, out))
    assert again["shards_written"] == 0 and again["shards_skipped"] == first["shards"]
    assert again["first_batch_seconds"] is None  # nothing to extract
    assert before == {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".h5")}
    with pytest.raises(Stage1Error, match="already holds a cache built with backbone"):
        run_extract(_cfg(digits_small, tiny_timm, out))
    with pytest.raises(Stage1Error, match="already holds a cache built with"):
        run_extract(_cfg(digits_small, tiny_hf, out, preprocess="hf"))
    with pytest.raises(Stage1Error, match="different input list"):
        run_extract(_cfg(digits_small, tiny_hf, out, labels=[digits_small["val"]]))
    assert before == {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(".h5")}


def test_plan_batches_ramp_from_the_run_start_and_forwards_aligned_to_each_shard():
    from extract.run import plan_batches, shard_ranges

    ranges = shard_ranges(1000, 300)  # 300, 300, 300, 100
    batches, shard = plan_batches(ranges, [0, 1, 2, 3], 64, 8)
    assert [len(b) for b in batches[:8]] == [8, 8, 16, 16, 32, 32, 64, 64]
    assert [i for b in batches for i in b] == list(range(1000))  # every input once, in order
    for b, k in zip(batches, shard, strict=True):
        a, z = ranges[k]
        assert a <= b[0] and b[-1] < z  # never across a shard
        assert (b[0] - a) % 8 == 0 and len(b) <= 64

    def forwards(bs):  # the images of each model forward
        return [tuple(b[c:c + 8]) for b in bs for c in range(0, len(b), 8)]

    # a run resumed at shard 2 starts its ramp there, and its forwards hold the same images
    resumed, _ = plan_batches(ranges, [2, 3], 64, 8)
    assert len(resumed[0]) == 8
    assert forwards(resumed) == [f for f in forwards(batches) if f[0] >= 600]
    with pytest.raises(ValueError, match="does not divide"):
        plan_batches(ranges, [0], 64, 24)


def test_forward_batch_chunks_match_whole_batches(digits_small, tmp_path, tiny_hf):
    whole = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "a", shard_size=64, batch_size=16))
    chunked = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "b", shard_size=64, batch_size=16, forward_batch=4))
    assert (whole["forward_batch"], chunked["forward_batch"]) == (16, 4)
    with open_cache(str(tmp_path / "a")) as a, open_cache(str(tmp_path / "b")) as b:
        assert a.paths.tolist() == b.paths.tolist()
        for name in ("cls", "patch_mean"):
            np.testing.assert_allclose(a.features(name), b.features(name), rtol=1e-4, atol=1e-5)
    with pytest.raises(Stage1Error, match="--forward-batch 3 must divide --batch-size 16"):
        run_extract(_cfg(digits_small, tiny_hf, tmp_path / "c", batch_size=16, forward_batch=3))


def test_max_failures(digits_small, tmp_path, tiny_hf):
    s = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "c", max_failures="2"))
    assert s["failures_exceeded"] and s["max_failures"] == 2
    s = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "c", max_failures="20%"))
    assert not s["failures_exceeded"]


def _extract_cmd(digits, spec, out, sizes=("--batch-size", "2", "--shard-size", "4")):
    return [sys.executable, "-m", "headlab", "extract", "--images", digits["root"], "--labels", digits["train"],
            "--backbone", spec, "--out", str(out), "--workers", "0", *sizes, "--max-failures", "5", "--quiet"]


def kill_and_resume(cmd, out, *, after_shards: int = 2, timeout: float = 300) -> None:
    """Start ``cmd``, SIGKILL it once ``after_shards`` shards are complete, then re-run it."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < timeout:
        done = [f for f in os.listdir(out) if f.endswith(".h5")] if os.path.isdir(out) else []
        if len(done) >= after_shards or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(Stage1Error):  # the killed cache is not accepted as complete
        open_cache(str(out))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("sizes", [("--batch-size", "2", "--shard-size", "4"),
                                   # batches of 1, 1, 2, 2, 4 from the run's start, forwards of 1
                                   ("--batch-size", "4", "--forward-batch", "1", "--shard-size", "6")],
                         ids=["batch", "ramp"])
def test_resume_after_sigkill_is_bitwise_identical(digits_small, tmp_path, tiny_hf, sizes):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = subprocess.run(_extract_cmd(digits_small, tiny_hf, ref, sizes), env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    kill_and_resume(_extract_cmd(digits_small, tiny_hf, killed, sizes), killed)
    assert verify_cache(str(killed)) == []
    with open_cache(str(ref)) as a, open_cache(str(killed)) as b:
        for name in ("cls", "patch_mean"):
            fa, fb = a.features(name, dtype=np.float16), b.features(name, dtype=np.float16)
            assert fa.tobytes() == fb.tobytes()
        assert a.paths.tolist() == b.paths.tolist() and a.labels.tolist() == b.labels.tolist()
        assert a.failures == b.failures


def test_compiled_model_is_not_compiled_again_inside_the_run(digits_small, tmp_path, tiny_hf, monkeypatch):
    """The compile's warm-up call takes an input like the batches' (made outside inference
    mode), so the first batch does not fail the compiled model's guards and compile again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real = torch.compile
    graphs = []  # graphs compiled so far, after each call: the warm-up's, then each forward's

    def compile_(model, **k):
        fn = real(model, backend="eager", **k)  # dynamo's guards as with inductor; no C++ toolchain

        def forward(x):
            y = fn(x)
            graphs.append(counters["stats"]["unique_graphs"])
            return y
        return forward

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    counters.clear()
    try:
        s = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "c", compile="on", batch_size=16, forward_batch=8,
                             shard_size=64))
    finally:
        torch._dynamo.reset()
    assert s["compiled"] and len(graphs) > 3 and graphs[0] >= 1
    assert graphs == [graphs[0]] * len(graphs)  # nothing compiled after the warm-up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_give_each_forward_its_own_features(digits_small, tmp_path, tiny_hf):
    """With CUDA graphs every forward is replayed into the same output memory, so each one's
    features must be copied out before the next replay overwrites them: several forwards per
    batch and a padded last one, against the same compiled model launched kernel by kernel."""
    from torch._dynamo.utils import counters

    kw = dict(device="cuda", decoder="nvjpeg", batch_size=16, forward_batch=4, shard_size=20, max_failures="20%")
    counters.clear()
    a = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "graphs", **kw))
    assert a["cuda_graphs"] and counters["inductor"]["cudagraph_skips"] == 0
    b = run_extract(_cfg(digits_small, tiny_hf, tmp_path / "kernels", cuda_graphs=False, **kw))
    assert b["compiled"] and not b["cuda_graphs"]
    with open_cache(str(tmp_path / "graphs")) as ca, open_cache(str(tmp_path / "kernels")) as cb:
        assert ca.paths.tolist() == cb.paths.tolist() and len(ca.paths) > 3 * 4
        for name in ("cls", "patch_mean"):
            fa, fb = torch.from_numpy(ca.features(name)), torch.from_numpy(cb.features(name))
            cos = torch.nn.functional.cosine_similarity(fa, fb)
            assert cos.min() >= 0.9999, float(cos.min())  # a row overwritten by a later forward fails here


def test_extract_keeps_what_it_made_before_the_loop_out_of_the_collector(digits_small, tmp_path, tiny_hf,
                                                                          monkeypatch):
    """While rows are written the objects made before (input list, model) are frozen, so a
    full garbage collection does not scan them; unfrozen again when the run returns."""
    import gc

    import extract.run as run_mod

    seen = []
    real = run_mod.ShardWriter.add_rows

    def add_rows(self, *a, **k):
        seen.append(gc.get_freeze_count())
        return real(self, *a, **k)

    monkeypatch.setattr(run_mod.ShardWriter, "add_rows", add_rows)
    assert gc.get_freeze_count() == 0

    def run(out: str) -> None:
        run_mod.run_extract(run_mod.ExtractConfig(images=[digits_small["root"]], labels=[digits_small["train"]],
                                                  backbone=tiny_hf, out=str(tmp_path / out), device="cpu",
                                                  progress=False, workers=0))

    run("c")
    assert seen and all(n > 1000 for n in seen)
    assert gc.get_freeze_count() == 0
    # a few objects frozen before (as a library had on the GPU machine): the run's are frozen
    # too, and everything stays frozen after (the caller's objects are not unfrozen)
    keep = [[k] for k in range(10)]
    gc.collect()
    try:
        gc.freeze()
        before = gc.get_freeze_count()
        seen.clear()
        run("d")
        assert seen and all(n > before for n in seen)  # the run's own objects were frozen too
        assert gc.get_freeze_count() >= before
    finally:
        gc.unfreeze()
    del keep


def test_torchrun_ranks_write_contiguous_shards_that_open_as_the_one_process_cache(digits_small, tmp_path, tiny_hf):
    """`torchrun --nproc-per-node 2 -m headlab extract` (on the CPU): each rank writes only its
    own contiguous block of shards, no input is padded or duplicated, the shards open as one
    cache with the rows of a one-process run in the same order, and a re-run skips them all."""
    import json

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    base = _extract_cmd(digits_small, tiny_hf, one)[3:]
    r = subprocess.run([sys.executable, "-m", "headlab", *base, "--device", "cpu"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    many = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
            "-m", "headlab", *_extract_cmd(digits_small, tiny_hf, two)[3:], "--device", "cpu", "--json"]

    def summaries(run) -> list[dict]:
        assert run.returncode == 0, run.stderr[-3000:]
        dec, txt, pos, found = json.JSONDecoder(), run.stdout, 0, []
        while (pos := txt.find("{", pos)) >= 0:
            obj, pos = dec.raw_decode(txt, pos)
            found.append(obj)
        return sorted(found, key=lambda o: o["rank"])

    first = summaries(subprocess.run(many, env=env, capture_output=True, text=True, timeout=600))
    n_shards = first[0]["shards"]
    assert [o["world_size"] for o in first] == [2, 2] and n_shards >= 4
    # contiguous blocks, all shards written once: rank 0 the first half, rank 1 the rest
    assert [o["shards_written"] for o in first] == [n_shards - n_shards // 2, n_shards // 2]
    from cache.reader import read_shard_info
    from extract.run import rank_shards, shard_name

    for rank in (0, 1):
        for k in rank_shards(n_shards, rank, 2):
            info = read_shard_info(str(two / shard_name(k)))
            assert (info.input_start, info.input_stop) == (4 * k, min(4 * k + 4, first[0]["inputs"]))
    with open_cache(str(one)) as a, open_cache(str(two)) as b:
        assert b.paths.tolist() == a.paths.tolist() and b.index.tolist() == a.index.tolist()
        assert len(set(b.index.tolist())) == len(b)  # nothing duplicated
        assert a.failures == b.failures
        for name in ("cls", "patch_mean"):
            np.testing.assert_allclose(b.features(name), a.features(name), rtol=1e-3, atol=1e-3)
    again = summaries(subprocess.run(many, env=env, capture_output=True, text=True, timeout=600))
    assert [o["shards_written"] for o in again] == [0, 0] and all(o["shards_skipped"] == n_shards for o in again)


def test_each_torchrun_process_is_narrowed_to_its_own_gpu_before_cuda_starts(monkeypatch):
    from extract import run as run_mod

    def rank(local: int, world: int = 2) -> None:
        monkeypatch.setenv("RANK", str(local))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("WORLD_SIZE", str(world))

    monkeypatch.setattr(run_mod.torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(run_mod.torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    rank(1)
    assert run_mod.narrow_to_local_gpu("auto") is True and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a, GPU-b,GPU-c")  # the user's list is narrowed, not replaced
    assert run_mod.narrow_to_local_gpu("cuda") is True and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b"
    # left alone: an explicit device, the CPU, one process, one visible GPU, too few GPUs, CUDA already started
    for device, local, world, visible in (("cuda:1", 1, 2, "0,1"), ("cpu", 1, 2, "0,1"), ("auto", 0, 1, "0,1"),
                                          ("auto", 1, 2, "3"), ("auto", 2, 3, "0,1")):
        rank(local, world)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert run_mod.narrow_to_local_gpu(device) is False and os.environ["CUDA_VISIBLE_DEVICES"] == visible
    rank(1)
    monkeypatch.setattr(run_mod.torch.cuda, "is_initialized", lambda: True)
    assert run_mod.narrow_to_local_gpu("auto") is False and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    # the device then used: cuda:0 when the driver sees one GPU, else the local rank's
    monkeypatch.setattr(run_mod.torch._C, "_cuda_getDeviceCount", lambda: 1)
    assert run_mod._local_cuda_device(1, 2) == run_mod.torch.device("cuda", 0)
    monkeypatch.setattr(run_mod.torch._C, "_cuda_getDeviceCount", lambda: 2)
    assert run_mod._local_cuda_device(1, 2) == run_mod.torch.device("cuda", 1)


def test_more_hardware_queues_is_set_before_cuda_starts_and_never_overrides(monkeypatch):
    from extract import run as run_mod

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    monkeypatch.setattr(run_mod.torch.cuda, "is_initialized", lambda: False)
    assert run_mod.more_hardware_queues() is True
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4")  # the user's choice stays
    assert run_mod.more_hardware_queues() is False and os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "4"
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    monkeypatch.setattr(run_mod.torch.cuda, "is_initialized", lambda: True)  # too late: say so, change nothing
    with pytest.warns(UserWarning, match="CUDA_DEVICE_MAX_CONNECTIONS=32"):
        assert run_mod.more_hardware_queues() is False
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
