"""File reading in worker processes through shared memory, against plain reads."""

from __future__ import annotations

import glob
import hashlib
import os

import pytest

from cache.errors import Stage1Error
from extract import readers
from extract.readers import ReaderPool, read_one


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    out = []
    for k in range(150):  # several chunks of 64, one partial
        p = d / f"f{k:03d}.jpg"
        p.write_bytes(os.urandom(1000 + 37 * k))
        out.append(str(p))
    (d / "empty.jpg").write_bytes(b"")
    out.insert(5, str(d / "empty.jpg"))
    out.insert(70, str(d / "missing.jpg"))
    os.mkdir(d / "a_dir.jpg")
    out.insert(100, str(d / "a_dir.jpg"))
    return out


def _shm_files():
    return set(glob.glob(os.path.join(readers.SHM_DIR, f"stage1-read-{os.getpid()}-*")))


@pytest.mark.parametrize("processes", [0, 3])
def test_reader_pool_matches_plain_reads(files, processes):
    if processes:
        assert readers.shm_available()  # Linux: the shared-memory path is what runs here
    before = _shm_files()
    pool = ReaderPool(processes, threads=4, chunk=64)
    assert pool.uses_processes == bool(processes)
    futs = [pool.submit(files[s:s + 100]) for s in range(0, len(files), 100)]
    got = [r for f in futs for r in pool.result(f)]
    pool.close()
    assert len(got) == len(files)
    for f, r in zip(files, got, strict=True):
        ref = read_one(f)
        assert r.reason == ref.reason, f
        if ref.reason is None:
            assert bytes(r.data) == open(f, "rb").read()
            assert r.sha256 == hashlib.sha256(open(f, "rb").read()).hexdigest() == ref.sha256
            assert r.cpu and ref.cpu and r.size is None  # random bytes are no JPEG
    reasons = {os.path.basename(f): r.reason for f, r in zip(files, got, strict=True) if r.reason}
    assert reasons == {"empty.jpg": "empty file", "missing.jpg": "file not found",
                       "a_dir.jpg": reasons.get("a_dir.jpg")} and reasons["a_dir.jpg"].startswith("cannot read")
    assert _shm_files() == before  # every shared-memory file was unlinked once mapped


def test_full_shared_memory_falls_back_to_the_pipe(files, monkeypatch):
    """A /dev/shm too small for a chunk (containers often have 64 MB): bytes come through
    the pipe instead, same results, no shared-memory file written."""
    monkeypatch.setattr(readers, "_shm_free", lambda: 0)
    before = _shm_files()
    pool = ReaderPool(2, chunk=64)
    try:
        got = pool.result(pool.submit(files))
    finally:
        pool.close()
    for f, r in zip(files, got, strict=True):
        ref = read_one(f)
        assert r.reason == ref.reason and r.sha256 == ref.sha256
        if ref.reason is None:
            assert bytes(r.data) == bytes(ref.data)
    assert _shm_files() == before


def test_stale_shared_memory_of_dead_process_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SHM_DIR", str(tmp_path))
    dead = tmp_path / "stage1-read-999999999-abc-1"  # no such pid
    alive = tmp_path / f"stage1-read-{os.getpid()}-abc-1"
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    readers._remove_stale(str(tmp_path))
    assert not dead.exists() and alive.exists()


def test_dead_reader_process_raises_instead_of_hanging(files):
    pool = ReaderPool(1, chunk=64)
    try:
        pool.procs[0].kill()
        pool.procs[0].join()
        fut = pool.submit(files[:10])
        with pytest.raises(Stage1Error, match="file reader process .* died .* re-run the command"):
            pool.result(fut)
    finally:
        pool.close()


def test_many_small_tasks_do_not_deadlock(files):
    """More queued tasks than the pipes hold (results must drain while tasks are queued)."""
    pool = ReaderPool(2, chunk=1)
    try:
        futs = [pool.submit(files * 4) for _ in range(3)]  # ~1,800 one-file tasks
        for f in futs:
            got = pool.result(f)
            assert len(got) == 4 * len(files)
            assert sum(r.reason is None for r in got) == 4 * 150
    finally:
        pool.close()


@pytest.mark.parametrize("processes", [0, 2])
def test_readers_report_each_jpeg_frame_size(tmp_path, processes):
    """The header walk that flags files for the CPU decoder also returns the frame size, which
    the batch decoder uses to decode into one buffer per size."""
    import io

    from PIL import Image

    files, want = [], []
    for k, (h, w, mode) in enumerate([(48, 64, "RGB"), (720, 1280, "RGB"), (33, 17, "L"), (300, 200, "CMYK")]):
        buf = io.BytesIO()
        Image.new(mode, (w, h), 90 + k).save(buf, format="JPEG", quality=90, progressive=k == 1)
        files.append(str(tmp_path / f"i{k}.jpg"))
        open(files[-1], "wb").write(buf.getvalue())
        want.append((mode == "CMYK", (h, w)))
    pool = ReaderPool(processes, threads=2, chunk=2)
    got = pool.result(pool.submit(files))
    pool.close()
    assert [(r.cpu, r.size) for r in got] == [(read_one(f).cpu, read_one(f).size) for f in files] == want
