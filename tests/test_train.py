"""Head training on cached features: the recipe, the grid, splits, run dirs, streaming, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import schemas
from cache import Stage1Error
from headlab.evaluate import evaluate_run
from headlab.heads import HeadGrid, HeadSpec
from headlab.knn import knn_probs
from headlab.rundir import load_run
from headlab.splits import split_select_calib
from headlab.train import TrainConfig, run_train
from tests.conftest import blobs, make_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_caches")
    x, pm, y = blobs(3000, seed=0)
    out = {"train": make_cache(d / "train.h5", {"cls": x[:2000], "patch_mean": pm[:2000]}, y[:2000]),
           "val": make_cache(d / "val.h5", {"cls": x[2000:2600], "patch_mean": pm[2000:2600]}, y[2000:2600],
                             groups=[f"g{i // 3}" for i in range(600)]),
           "test": make_cache(d / "test.h5", {"cls": x[2600:], "patch_mean": pm[2600:]}, y[2600:])}
    return out


def _cfg(caches, out, **kw):
    base = dict(train=[caches["train"]], val=[caches["val"]], out=str(out), epochs=8, batch_size=128,
                progress=False, lr=[1e-3, 3e-3], knn_k=[5, 20])
    return TrainConfig(**{**base, **kw})


def test_split_is_deterministic_grouped_and_balanced():
    groups = [f"scene{i // 4}" for i in range(4000)]
    sel, cal = split_select_calib(groups, ratio=0.5, seed=3)
    sel2, cal2 = split_select_calib(groups, ratio=0.5, seed=3)
    assert np.array_equal(sel, sel2) and np.array_equal(cal, cal2)
    assert set(sel).isdisjoint(cal) and len(sel) + len(cal) == 4000
    side = {}
    for i in sel:
        side.setdefault(groups[i], set()).add("s")
    for i in cal:
        side.setdefault(groups[i], set()).add("c")
    assert all(len(v) == 1 for v in side.values())  # no group straddles
    assert abs(len(sel) / 4000 - 0.5) < 0.05
    other, _ = split_select_calib(groups, ratio=0.5, seed=4)
    assert not np.array_equal(sel, other)
    with pytest.raises(Stage1Error, match="left val_calib empty"):
        split_select_calib(["only-one"], ratio=0.5)


def test_grid_forward_equals_each_head():
    specs = [HeadSpec("mlp", "cls", 1e-3, 0.01, 0.3), HeadSpec("mlp", "cls", 1e-4, 0.0, 0.1),
             HeadSpec("linear", "cls+patch_mean", 1e-3, 0.01, 0.0), HeadSpec("linear", "patch_mean", 1e-2, 0.0, 0.0),
             HeadSpec("mlp", "patch_mean", 1e-3, 0.0, 0.3, hidden=32)]
    grid = HeadGrid(specs, {"cls": (0, 8), "patch_mean": (8, 16)}, 3).eval()
    x = torch.randn(7, 16)
    out = grid(x)
    assert out.shape == (5, 7, 3)
    for g, (head, (lo, hi)) in enumerate(zip(grid.heads, grid.slices, strict=True)):
        torch.testing.assert_close(out[g], head(x[:, lo:hi]))
    grid.train()
    grid(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in grid.parameters())


def test_train_writes_complete_run_dir(caches, tmp_path):
    res = run_train(_cfg(caches, tmp_path / "run", features=["cls", "cls+patch_mean"]))
    run = tmp_path / "run"
    for f in ("config.json", "splits.json", "results.json", "results.csv", "log.jsonl", "head.safetensors",
              "logits.npz"):
        assert (run / f).exists(), f
    assert len(list((run / "heads").glob("*.safetensors"))) == len(res["heads"]) == 2 * 2 * 2
    r = load_run(str(run))
    assert r.results["chosen_val_select"]["accuracy"] > 0.85  # separable blobs, 5% label noise
    lg = r.logits()
    assert lg["val_select_logits"].shape == (len(r.splits["val_select"]), 2)
    assert lg["train_logits"].shape == (2000, 2)
    assert set(r.splits["val_select"]).isdisjoint(r.splits["val_calib"])
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert 1 <= len(log) <= 8 and all(len(e["val_select_mcc"]) == 8 for e in log)
    assert {k["k"] for k in res["knn"]} == {5, 20} and all(k["val_select_accuracy"] > 0.8 for k in res["knn"])
    # evaluate = the chosen head recomputed from its weights on a fresh cache
    ev = evaluate_run(str(run), [caches["test"]])
    assert ev["n"] == 400 and ev["accuracy"] > 0.85 and -1 <= ev["mcc"] <= 1
    # the stored val_calib logits are the chosen head's: evaluate on val reproduces them
    from cache import open_cache
    from headlab.rundir import head_logits

    with open_cache(caches["val"]) as c:
        np.testing.assert_allclose(head_logits(r, c)[r.splits["val_calib"]], lg["val_calib_logits"], atol=1e-5)


def test_reproducible_with_seed(caches, tmp_path):
    a = run_train(_cfg(caches, tmp_path / "a", epochs=3, knn_k=[]))
    b = run_train(_cfg(caches, tmp_path / "b", epochs=3, knn_k=[]))
    assert [h["val_select_nll"] for h in a["heads"]] == [h["val_select_nll"] for h in b["heads"]]
    assert (tmp_path / "a" / "head.safetensors").read_bytes() == (tmp_path / "b" / "head.safetensors").read_bytes()


def test_k_classes(tmp_path):
    x, pm, y = blobs(1500, k=4, seed=1, sep=2.0)
    tr = make_cache(tmp_path / "tr.h5", {"cls": x[:1000], "patch_mean": pm[:1000]}, y[:1000])
    va = make_cache(tmp_path / "va.h5", {"cls": x[1000:], "patch_mean": pm[1000:]}, y[1000:])
    res = run_train(TrainConfig(train=[tr], val=[va], out=str(tmp_path / "run"), epochs=6, progress=False,
                                lr=[3e-3], knn_k=[10]))
    assert res["num_classes"] == 4 and res["chosen_val_select"]["accuracy"] > 0.8
    assert np.isfinite(res["chosen_val_select"]["auroc"])


def test_streaming_matches_in_memory_quality(caches, tmp_path):
    mem = run_train(_cfg(caches, tmp_path / "mem", head=["linear"], lr=[3e-3], knn_k=[]))
    st = run_train(_cfg(caches, tmp_path / "st", head=["linear"], lr=[3e-3], knn_k=[], max_memory="40KB"))
    assert st["streamed"] and not mem["streamed"]
    assert abs(st["chosen_val_select"]["accuracy"] - mem["chosen_val_select"]["accuracy"]) < 0.03


def test_memory_budget_counts_the_read_block(caches, tmp_path):
    """In memory only when the float32 matrix and the block it is read through both fit
    under --max-memory; a budget that holds the matrix alone streams."""
    from cache import open_cache
    from headlab.data import in_memory_bytes

    with open_cache(caches["train"]) as c:
        need = in_memory_bytes(c, ["cls"])
        matrix = len(c) * 4 * c.feature_sets["cls"]
    assert matrix < need
    kw = dict(head=["linear"], lr=[3e-3], knn_k=[], epochs=1, features=["cls"])
    assert run_train(_cfg(caches, tmp_path / "a", max_memory=str(need - 1), **kw))["streamed"]
    assert not run_train(_cfg(caches, tmp_path / "b", max_memory=str(need), **kw))["streamed"]


def test_quality_at_least_logistic_regression(tmp_path):
    """Real data (scikit-learn's digits, >=5 vs <5) through a fixed random-feature map:
    the chosen head must match or beat LogisticRegression on the same features."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(64, 48)) / 8.0
    feats = np.tanh(d.data @ proj / 4.0).astype(np.float32)  # (1797, 48)
    y = (d.target >= 5).astype(np.int64)
    idx = rng.permutation(len(y))
    tr, va, te = idx[:1000], idx[1000:1400], idx[1400:]
    paths = {k: make_cache(tmp_path / f"{k}.h5", {"cls": feats[i], "patch_mean": feats[i]}, y[i], dtype="float32")
             for k, i in (("tr", tr), ("va", va), ("te", te))}
    run_train(TrainConfig(train=[paths["tr"]], val=[paths["va"]], out=str(tmp_path / "run"), epochs=40,
                          lr=[1e-3, 3e-3], progress=False, knn_k=[], patience=10))
    ours = evaluate_run(str(tmp_path / "run"), [paths["te"]])["accuracy"]
    lr = LogisticRegression(max_iter=5000).fit(feats[tr], y[tr]).score(feats[te], y[te])
    assert ours >= lr, (ours, lr)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    tr, q = rng.normal(size=(50, 6)), rng.normal(size=(9, 6))
    y = rng.integers(0, 3, 50)
    got = knn_probs(tr, y, q, ks=[5], temperature=0.1, num_classes=3, chunk=4)[5]
    trn = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    for i in range(9):
        sims = trn @ qn[i]
        top = np.argsort(-sims)[:5]
        votes = np.zeros(3)
        for j in top:
            votes[y[j]] += np.exp(sims[j] / 0.1)
        np.testing.assert_allclose(got[i], votes / votes.sum(), rtol=1e-5)
    # a column block of a wider float32 matrix (used in place, not copied), and chunks cut
    # by the similarity matrix's size (here 2 queries: 2 x 50 x 4 bytes = 400)
    wide = np.zeros((50, 10), np.float32)
    wide[:, 2:8] = tr
    by_bytes = knn_probs(wide[:, 2:8], y, q, ks=[5], temperature=0.1, num_classes=3, chunk_bytes=400)[5]
    np.testing.assert_allclose(by_bytes, got, rtol=1e-5)


def test_train_errors(caches, tmp_path):
    x, pm, y = blobs(100, seed=2)
    other = make_cache(tmp_path / "other.h5", {"cls": x, "patch_mean": pm}, y, prov={"preprocessing": {"preset": "hf"}})
    unl = make_cache(tmp_path / "unl.h5", {"cls": x, "patch_mean": pm}, np.full(100, -1))
    only_cls = make_cache(tmp_path / "cls.h5", {"cls": x}, y)
    tiny = make_cache(tmp_path / "tiny.h5", {"cls": x[:1], "patch_mean": pm[:1]}, y[:1])
    cases = [
        (dict(val=[other]), "caches do not match: train"),
        (dict(val=[unl]), "100 unlabelled rows"),
        (dict(train=[only_cls], val=[only_cls], features=["patch_mean"]), "feature set 'patch_mean' is not in this cache"),
        (dict(val=[tiny]), "left val_"),
        (dict(head=["transformer"]), "--head"),
        (dict(select_metric="f1"), "--select-metric 'f1'"),
        (dict(max_memory="lots"), "--max-memory 'lots'"),
    ]
    for kw, match in cases:
        with pytest.raises(Stage1Error, match=match):
            run_train(_cfg(caches, tmp_path / "bad", **kw))
    run_train(_cfg(caches, tmp_path / "done", epochs=1, knn_k=[], head=["linear"], lr=[1e-3]))
    with pytest.raises(Stage1Error, match="already holds a finished run"):
        run_train(_cfg(caches, tmp_path / "done", epochs=1))
    schemas.read_json(str(tmp_path / "done" / "results.json"), "train_results")
    with pytest.raises(Stage1Error, match="cache fingerprint .* differs from the run's"):
        evaluate_run(str(tmp_path / "done"), [other])
    os.remove(tmp_path / "done" / "head.safetensors")
    with pytest.raises(Stage1Error, match="head.safetensors: missing"):
        evaluate_run(str(tmp_path / "done"), [caches["test"]])


def _grad_in_head_units(grid, g):
    gi, pos = grid._where[g]
    st = grid.stacks[gi]
    return {n: p.grad[pos] / st.scale[pos] for n, p in zip(st.names, st.stacked(), strict=True)}


def test_clip_per_head_equals_torch_per_head():
    from headlab.train import clip_per_head

    specs = [HeadSpec("mlp", "cls", 1e-3, 0.01, 0.0), HeadSpec("linear", "cls", 1e-3, 0.01, 0.0),
             HeadSpec("linear", "cls", 1e-4, 0.01, 0.0), HeadSpec("mlp", "cls", 3e-4, 0.01, 0.0)]
    grid = HeadGrid(specs, {"cls": (0, 8)}, 2).eval()
    heads = grid.heads
    x = torch.randn(16, 8) * 50
    (grid(x) ** 2).sum().backward()
    clip_per_head(grid, 1.0)
    for g, h in enumerate(heads):
        (h(x) ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
        got = _grad_in_head_units(grid, g)
        for n, p in h.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hps", [[(1e-2, 0.0), (3e-3, 0.05), (1e-3, 0.5)],  # per-head decay by decay_
                                 [(1e-2, 0.05), (2e-2, 0.025), (5e-3, 0.1)]])  # same lr*wd: AdamW decays
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_stacked_heads_train_like_separate_adamw(kind, hps):
    """Heads stacked in one tensor, with their own lr and weight decay, follow the same
    trajectory as each head trained alone with torch's AdamW(lr, weight_decay)."""
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    specs = [HeadSpec(kind, "cls", lr, wd, 0.0, hidden=16) for lr, wd in hps]
    grid = HeadGrid(specs, {"cls": (0, 8)}, 3).train()
    heads = grid.heads
    opt = create_optimizer_v2(grid.param_groups(), opt="adamw", lr=1e-3, weight_decay=0.0, fused=True)
    refs = [torch.optim.AdamW(h.parameters(), lr=s.lr, weight_decay=s.weight_decay) for h, s in zip(heads, specs, strict=True)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(grid(x).reshape(-1, 3), y.repeat(3), reduction="sum").backward()
        grid.decay_([g["lr"] for g in opt.param_groups])
        opt.step()
        for h, o in zip(heads, refs, strict=True):
            o.zero_grad()
            torch.nn.functional.cross_entropy(h(x), y, reduction="sum").backward()
            o.step()
    for g, h in enumerate(heads):
        got = grid.head_state(g)
        for n, p in h.state_dict().items():
            torch.testing.assert_close(got[n], p, rtol=2e-4, atol=2e-5)
    # the three heads really moved differently (different lr and decay)
    assert not torch.allclose(grid.head_state(0)[grid.stacks[0].names[0]], grid.head_state(2)[grid.stacks[0].names[0]])


def test_grid_dropout_gradient_is_exact():
    """The in-place masking in HeadGrid.forward gives the same gradients as the plain
    relu(z) * mask / keep written out with autograd."""
    specs = [HeadSpec("mlp", "cls", 1e-3, 0.0, 0.4, hidden=32), HeadSpec("mlp", "cls", 3e-4, 0.0, 0.2, hidden=32)]
    grid = HeadGrid(specs, {"cls": (0, 6)}, 3).train()
    assert grid.stacks[0].scaled  # different lrs: the lr-scale path is covered too
    x = torch.randn(20, 6)
    drop = grid._dropout_mask(torch.zeros(20, 64), [0.4, 0.2], 32)
    grid._dropout_mask = lambda *a: drop  # the same mask for both computations
    (grid(x) ** 2).sum().backward()
    heads = grid.heads
    mask = drop[0].float()
    for g, h in enumerate(heads):
        m = mask[:, 32 * g:32 * (g + 1)]
        out = F.linear(F.relu(F.linear(x, h.fc1.weight, h.fc1.bias)) * m / (1 - specs[g].dropout),
                       h.fc2.weight, h.fc2.bias)
        (out ** 2).sum().backward()
        got = _grad_in_head_units(grid, g)
        for n, p in h.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-5)


def test_grid_dropout_rates_and_scale():
    specs = [HeadSpec("mlp", "cls", 1e-3, 0.0, 0.3, hidden=2000), HeadSpec("mlp", "cls", 1e-3, 0.0, 0.7, hidden=2000)]
    grid = HeadGrid(specs, {"cls": (0, 4)}, 2).train()
    mask, inv = grid._dropout_mask(torch.ones(200, 4000), [0.3, 0.7], 2000)
    kept = mask.float().mean(0)
    assert abs(kept[:2000].mean() - 0.7) < 0.01 and abs(kept[2000:].mean() - 0.3) < 0.01
    torch.testing.assert_close(inv, torch.tensor([1 / 0.7, 1 / 0.3]), rtol=1e-4, atol=0)
    # inverted dropout keeps the expected output: the mean over many draws of the trained
    # grid's output approaches the eval-mode output
    x = torch.randn(4, 4)
    ev = grid.eval()(x)
    grid.train()
    draws = torch.stack([grid(x) for _ in range(3000)])
    se = draws.std(0) / 3000 ** 0.5
    assert ((draws.mean(0) - ev).abs() <= 5 * se).all()  # unbiased, up to 5 standard errors
    assert grid._dropout_mask(torch.ones(2, 4000), [0.0, 0.0], 2000) is None


