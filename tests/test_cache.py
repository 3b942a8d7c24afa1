"""The cache contract: round trip, atomic shards, merged views, fingerprints, verify, merge."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from cache import ShardWriter, Stage1Error, fingerprint_of, open_cache
from cache.tools import cache_info, merge_caches, verify_cache

PROV = {"format_version": 1, "backbone": {"library": "hf", "weights_sha256": "ab" * 32}, "preprocessing": {"preset": "baseline"},
        "feature_dtype": "float16", "feature_sets": ["cls", "patch_mean"], "libraries": {"torch": "x"}}


def _write(path, start, stop, total, *, prov=PROV, plan_id="p" * 64, dim=8, seed=0, fail_every=0, finish=True):
    rng = np.random.default_rng(seed)
    w = ShardWriter(path, feature_dims={"cls": dim, "patch_mean": dim}, provenance=prov,
                    fingerprint=fingerprint_of(prov), classes=["no", "yes"],
                    plan={"plan_id": plan_id, "input_start": start, "input_stop": stop, "num_inputs": total})
    idx = [i for i in range(start, stop) if not (fail_every and i % fail_every == 0)]
    for i in range(start, stop):
        if fail_every and i % fail_every == 0:
            w.add_failure(i, f"img{i}.jpg", "not an image")
    feats = {k: rng.normal(size=(len(idx), dim)).astype(np.float32) for k in ("cls", "patch_mean")}
    w.add_rows(features=feats, labels=[i % 2 for i in idx], paths=[f"img{i}.jpg" for i in idx],
               sha256=[f"{i:064x}" for i in idx], source=["s"] * len(idx), group=[f"g{i // 3}" for i in idx],
               index=idx)
    if finish:
        w.finish()
    return w, feats, idx


def test_round_trip_one_shard(tmp_path):
    path = str(tmp_path / "shard-00000.h5")
    _, feats, idx = _write(path, 0, 10, 10)
    with open_cache(path) as c:
        assert len(c) == 10
        assert c.feature_sets == {"cls": 8, "patch_mean": 8}
        np.testing.assert_array_equal(c.features("cls"), feats["cls"].astype(np.float16).astype(np.float32))
        assert c.features("cls", dtype=np.float16).dtype == np.float16
        assert c.labels.tolist() == [i % 2 for i in idx]
        assert c.paths[3] == "img3.jpg" and c.sha256[3] == f"{3:064x}" and c.group[3] == "g1"
        assert c.index.tolist() == idx
        assert c.classes == ["no", "yes"]
        assert c.provenance["libraries"] == {"torch": "x"}
        assert c.fingerprint == fingerprint_of(PROV)


def test_features_fill_a_column_block_across_shards(tmp_path, monkeypatch):
    """``features(out=...)`` fills a column block of a wider matrix, read a few rows at a
    time across shard boundaries; ``load_matrix`` puts sets side by side that way."""
    from headlab.data import load_matrix

    d = str(tmp_path / "c")
    os.makedirs(d)
    parts = [_write(os.path.join(d, f"shard-{i:05d}.h5"), a, b, 25, seed=i)[1] for i, (a, b) in
             enumerate([(0, 10), (10, 25)])]
    want = {k: np.concatenate([p[k] for p in parts]).astype(np.float16).astype(np.float32) for k in ("cls", "patch_mean")}
    monkeypatch.setattr("cache.reader.FeatureCache.READ_ROWS", 4)
    with open_cache(d) as c:
        wide = np.full((25, 20), -7.0, dtype=np.float32)
        c.features("patch_mean", out=wide[:, 2:10])
        np.testing.assert_array_equal(wide[:, 2:10], want["patch_mean"])
        assert (wide[:, :2] == -7).all() and (wide[:, 10:] == -7).all()
        np.testing.assert_array_equal(load_matrix(c, ["cls", "patch_mean"]),
                                      np.concatenate([want["cls"], want["patch_mean"]], axis=1))
        with pytest.raises(ValueError, match="needs"):
            c.features("cls", out=np.empty((25, 3), np.float32))
        with pytest.raises(Stage1Error, match="no feature set 'pooled'"):
            load_matrix(c, ["cls", "pooled"])


def test_load_matrix_peak_memory_is_the_matrix(tmp_path):
    """Loading a float16 shard as float32 holds the result and one block, not the result
    plus a float16 copy of the whole shard (numpy reports its buffers to tracemalloc)."""
    import tracemalloc

    from headlab.data import load_matrix

    n, dim = 65536, 128
    path = str(tmp_path / "big.h5")
    w = ShardWriter(path, feature_dims={"cls": dim}, provenance=PROV, fingerprint=fingerprint_of(PROV),
                    plan={"plan_id": "p" * 64, "input_start": 0, "input_stop": n, "num_inputs": n})
    w.add_rows(features={"cls": np.ones((n, dim), np.float32)}, labels=np.zeros(n, int), paths=[""] * n,
               sha256=["0" * 64] * n, source=["s"] * n, group=["g"] * n, index=np.arange(n))
    w.finish()
    f32, f16 = n * dim * 4, n * dim * 2
    with open_cache(path) as c:
        tracemalloc.start()
        try:
            x = load_matrix(c, ["cls"])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert x.shape == (n, dim) and x.dtype == np.float32
        block = c.READ_ROWS * dim * 2
        assert block < f16 / 2
        assert peak <= f32 + block + (1 << 20), (peak, f32, block)


@pytest.mark.parametrize("flush_rows", [1, 7, 64, None])
def test_buffered_writes_give_the_same_shard(tmp_path, flush_rows):
    """Rows gathered in memory and written every ``flush_rows`` give the shard that one
    write per call gives, whatever the calls' sizes (some larger than the buffer)."""
    rng = np.random.default_rng(3)
    sizes = [3, 5, 1, 20, 2, 9, 30, 4]
    n = sum(sizes)
    feats = {k: rng.normal(size=(n, 8)).astype(np.float32) for k in ("cls", "patch_mean")}

    def write(path, rows):
        w = ShardWriter(path, feature_dims={"cls": 8, "patch_mean": 8}, provenance=PROV,
                        fingerprint=fingerprint_of(PROV), classes=["no", "yes"], flush_rows=rows,
                        plan={"plan_id": "p" * 64, "input_start": 0, "input_stop": n, "num_inputs": n})
        a = 0
        for k, m in enumerate(sizes):
            sl = slice(a, a + m)
            w.add_rows(features={name: f[sl] for name, f in feats.items()}, labels=[i % 2 for i in range(a, a + m)],
                       paths=[f"dir/img{i}.jpg" for i in range(a, a + m)], sha256=[f"{i:064x}" for i in range(a, a + m)],
                       source=[f"s{k}"] * m, group=[f"g{i // 3}" for i in range(a, a + m)], index=list(range(a, a + m)))
            if k == 2:
                w.add_failure(n + 1, "dir/broken.jpg", "not an image")
            a += m
        assert w.rows == n
        return w.finish()

    (tmp_path / "ref").mkdir()
    (tmp_path / "got").mkdir()
    ref = write(str(tmp_path / "ref" / "shard-00000.h5"), 1)  # every call written as it comes
    got = write(str(tmp_path / "got" / "shard-00000.h5"), flush_rows)
    with h5py.File(ref, "r") as a, h5py.File(got, "r") as b:
        for name in ("features/cls", "features/patch_mean", "labels", "index", "sha256", "paths", "source", "group",
                     "failures/index", "failures/path"):
            assert a[name].shape == b[name].shape and a[name].shape[0] in (n, 1), name
            assert a[name][...].tolist() == b[name][...].tolist(), name
        assert b.attrs["rows"] == n


def test_writer_refuses_columns_of_other_lengths(tmp_path):
    w = ShardWriter(str(tmp_path / "shard-00000.h5"), feature_dims={"cls": 4}, provenance=PROV,
                    fingerprint=fingerprint_of(PROV), plan={"plan_id": "p" * 64, "input_start": 0, "input_stop": 2,
                                                            "num_inputs": 2})
    with pytest.raises(ValueError, match="paths has 1 values, want 2"):
        w.add_rows(features={"cls": np.zeros((2, 4))}, labels=[0, 1], paths=["a.jpg"], sha256=["0" * 64] * 2,
                   source=["s"] * 2, group=["g"] * 2, index=[0, 1])
    w.abort()
    assert not os.listdir(tmp_path)


def test_partial_shard_is_never_read(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    w, _, _ = _write(str(d / "shard-00000.h5"), 0, 10, 10, finish=False)
    w._f.flush()
    assert os.path.exists(str(d / "shard-00000.h5.partial"))
    with pytest.raises(Stage1Error, match="only unfinished .partial shards"):
        open_cache(str(d))
    w.abort()
    assert not os.path.exists(str(d / "shard-00000.h5.partial"))


def test_incomplete_flag_refused(tmp_path):
    path = str(tmp_path / "x.h5")
    _write(path, 0, 4, 4)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(Stage1Error, match="shard is incomplete"):
        open_cache(path)


def test_directory_merged_view_in_input_order(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    # Written out of order on purpose: the reader orders by input range.
    _, f1, i1 = _write(str(d / "shard-00001.h5"), 5, 10, 12, seed=1)
    _, f0, i0 = _write(str(d / "shard-00000.h5"), 0, 5, 12, seed=0)
    _, f2, i2 = _write(str(d / "shard-00002.h5"), 10, 12, 12, seed=2, fail_every=11)
    with open_cache(str(d)) as c:
        assert c.index.tolist() == i0 + i1 + i2
        want = np.concatenate([f0["cls"], f1["cls"], f2["cls"]]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(c.features("cls"), want)
        chunks = list(c.iter_feature_chunks("cls", 3))
        np.testing.assert_array_equal(np.concatenate([b for _, b in chunks]).astype(np.float32), want)
        assert [s for s, _ in chunks][:3] == [0, 3, 5]
        assert c.failures == [{"index": 11, "path": "img11.jpg", "reason": "not an image"}]
    assert verify_cache(str(d)) == []


def test_missing_shard_refused_and_reported(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _write(str(d / "shard-00000.h5"), 0, 5, 12)
    _write(str(d / "shard-00002.h5"), 10, 12, 12)
    with pytest.raises(Stage1Error, match=r"cover 7 of 12 inputs \(inputs 5..9 missing\); re-run"):
        open_cache(str(d))
    with open_cache(str(d), allow_partial=True) as c:
        assert len(c) == 7
    problems = verify_cache(str(d))
    assert any("missing input ranges 5..9" in p for p in problems)
    assert cache_info(str(d))["complete"] is False


def test_fingerprint_mismatch_names_both(tmp_path):
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    _write(a, 0, 4, 4)
    other = {**PROV, "preprocessing": {"preset": "hf"}}
    _write(b, 0, 4, 4, prov=other, plan_id="q" * 64)
    with pytest.raises(Stage1Error, match=rf"{a} has fingerprint {fingerprint_of(PROV)[:12]} but {b} has "
                                          rf"{fingerprint_of(other)[:12]}"):
        open_cache([a, b])
    assert any("different fingerprints" in p for p in verify_cache([a, b]))


def test_fingerprint_ignores_library_versions_but_not_weights():
    assert fingerprint_of(PROV) == fingerprint_of({**PROV, "libraries": {"torch": "y"}})
    assert fingerprint_of(PROV) != fingerprint_of({**PROV, "backbone": {"weights_sha256": "cd" * 32}})
    assert fingerprint_of(PROV) != fingerprint_of({**PROV, "feature_dtype": "float32"})


def test_verify_finds_nan_and_row_mismatch(tmp_path):
    path = str(tmp_path / "x.h5")
    _write(path, 0, 6, 6)
    with h5py.File(path, "r+") as f:
        f["features/cls"][2, 1] = np.nan
    problems = verify_cache(path)
    assert any("features/cls row 2 holds NaN/Inf" in p for p in problems)
    with h5py.File(path, "r+") as f:
        f["labels"].resize(5, axis=0)
    assert any("dataset labels has 5 rows" in p for p in verify_cache(path))


def test_not_a_cache_and_garbage(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"definitely not hdf5")
    with pytest.raises(Stage1Error, match="cannot be read as HDF5"):
        open_cache(str(junk))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(Stage1Error, match="not a stage1 feature cache"):
        open_cache(str(tmp_path / "other.h5"))
    with pytest.raises(Stage1Error, match="no such cache file"):
        open_cache(str(tmp_path / "nope.h5"))


def test_merge_round_trip(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _write(str(d / "shard-00000.h5"), 0, 5, 9, seed=0)
    _write(str(d / "shard-00001.h5"), 5, 9, 9, seed=1, fail_every=7)
    out = str(tmp_path / "merged.h5")
    res = merge_caches([str(d)], out)
    assert res["rows"] == 8
    with open_cache(str(d)) as a, open_cache(out) as b:
        np.testing.assert_array_equal(a.features("patch_mean"), b.features("patch_mean"))
        assert a.paths.tolist() == b.paths.tolist() and a.index.tolist() == b.index.tolist()
        assert b.failures == a.failures and a.fingerprint == b.fingerprint
    assert verify_cache(out) == []
    with pytest.raises(Stage1Error, match="already exists"):
        merge_caches([str(d)], out)


def test_unknown_feature_set(tmp_path):
    path = str(tmp_path / "x.h5")
    _write(path, 0, 3, 3)
    with open_cache(path) as c, pytest.raises(Stage1Error, match="no feature set 'pooled'; this cache has"):
        c.features("pooled")
