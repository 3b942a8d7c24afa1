"""File reading, hashing and JPEG header checks in worker processes.

At GPU speed (thousands of 300 KB files a second) the per-file CPU work -- read, sha256,
header walk -- does not fit in one Python process: threads contend for the GIL with the
decode and model threads. Here worker processes do it and hand the bytes back through
shared memory: each task (a chunk of one batch) is read straight into a fresh file in
``/dev/shm`` which the parent maps read-only and unlinks at once, so the bytes are copied
exactly once (disk cache -> shared memory) and the mapping disappears with its last view.

Where ``/dev/shm`` is missing (not Linux) :class:`ReaderPool` reads in threads instead.
This module imports no torch, so worker processes start fast.
"""

from __future__ import annotations

import glob
import hashlib
import mmap
import multiprocessing as mp
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from cache.errors import Stage1Error
from extract.jpeg_header import jpeg_info

SHM_DIR = "/dev/shm"


@dataclass
class FileRead:
    """One file's bytes (a read-only view; None if unreadable) and what was learnt of it."""

    data: memoryview | bytearray | None
    sha256: str
    reason: str | None  # why it failed, or None
    cpu: bool  # needs the per-image CPU decoder
    size: tuple[int, int] | None = None  # (height, width) its JPEG header states, where it has one


def read_one(file: str) -> FileRead:
    """Read, hash and check one file (in the calling thread)."""
    try:
        with open(file, "rb") as fh:
            data = bytearray(os.fstat(fh.fileno()).st_size)
            got = fh.readinto(data)
            del data[got:]
    except FileNotFoundError:
        return FileRead(None, "", "file not found", False)
    except OSError as e:
        return FileRead(None, "", f"cannot read: {e.strerror}", False)
    if not data:
        return FileRead(None, "", "empty file", False)
    return FileRead(data, hashlib.sha256(data).hexdigest(), None, *jpeg_info(data))


SHM_RESERVE = 256 << 20  # leave this much of /dev/shm free (others use it too)


def _shm_free() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def _read_chunk_to_shm(task: tuple[int, str, Sequence[str]]) -> tuple[int, str | bytearray | None, list]:
    """Worker: read the files of one chunk into one new shared-memory file.
    Returns ``(task id, shm path, [(offset, size, sha256, reason, cpu, (h, w) or None), ...])``; the path
    is None when nothing was read, and the bytes themselves (sent through the pipe) when
    ``/dev/shm`` is too full to hold them: a small ``/dev/shm`` (containers often get
    64 MB) must slow extraction down, not kill it with SIGBUS."""
    tid, prefix, files = task
    sizes, meta = [], []
    for f in files:
        try:
            sizes.append(os.stat(f).st_size)
        except FileNotFoundError:
            sizes.append(-1)
        except OSError:
            sizes.append(-2)
    total = sum(max(s, 0) for s in sizes)
    path = f"{prefix}-{tid}" if total else None
    mm = None
    if path and _shm_free() < total + SHM_RESERVE:
        path = mm = bytearray(total)
    elif path:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total)
        finally:
            os.close(fd)
    off = 0
    try:
        for f, size in zip(files, sizes, strict=True):
            if size == -1:
                meta.append((0, 0, "", "file not found", False, None))
                continue
            if size <= 0:
                meta.append((0, 0, "", "empty file" if size == 0 else "cannot read", False, None))
                continue
            view = memoryview(mm)[off:off + size]
            try:
                with open(f, "rb", buffering=0) as fh:
                    got = 0
                    while got < size:
                        k = fh.readinto(view[got:])
                        if not k:
                            break
                        got += k
            except OSError as e:
                view.release()
                meta.append((0, 0, "", f"cannot read: {e.strerror}", False, None))
                continue
            part = view[:got]
            cpu, hw = jpeg_info(part) if got else (False, None)
            meta.append((off, got, hashlib.sha256(part).hexdigest(), None if got else "empty file", cpu, hw))
            part.release()
            view.release()
            off += size
    finally:
        if isinstance(mm, mmap.mmap):
            mm.close()
    return tid, path, meta


def _worker(tasks, results) -> None:
    while True:
        task = tasks.get()
        if task is None:
            return
        try:
            results.put(_read_chunk_to_shm(task))
        except BaseException as e:  # report, never hang the parent
            results.put((task[0], None, repr(e)))


def _remove_stale(prefix_dir: str = SHM_DIR) -> None:
    """Remove shared-memory files left by a reader whose process was killed."""
    for path in glob.glob(os.path.join(prefix_dir, "stage1-read-*")):
        try:
            pid = int(os.path.basename(path).split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(path)
            except OSError:
                pass
        except (ValueError, IndexError, PermissionError):
            pass


def shm_available() -> bool:
    return os.name == "posix" and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class ReaderPool:
    """``submit(files) -> Future[list[FileRead]]``, results in shared memory from worker
    processes (``processes > 0`` and ``/dev/shm`` present) or read by threads."""

    def __init__(self, processes: int, *, threads: int = 8, chunk: int = 64) -> None:
        self.chunk = chunk
        self.procs: list = []
        self._futures: dict[int, tuple[Future, int, list]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._prefix = os.path.join(SHM_DIR, f"stage1-read-{os.getpid()}-{id(self):x}")
        if processes > 0 and shm_available():
            _remove_stale()
            # fork (as torch's DataLoader does on Linux): the workers run only this module's code
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self.tasks, self.results = ctx.SimpleQueue(), ctx.SimpleQueue()
            self.procs = [ctx.Process(target=_worker, args=(self.tasks, self.results), daemon=True,
                                      name=f"stage1-reader-{k}") for k in range(processes)]
            for p in self.procs:
                p.start()
            self._collector = threading.Thread(target=self._collect, daemon=True, name="stage1-read-collect")
            self._collector.start()
        else:
            self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage1-read")

    @property
    def uses_processes(self) -> bool:
        return bool(self.procs)

    def submit(self, files: Sequence[str]) -> Future:
        """Read ``files``; the future's result is a list of :class:`FileRead` in order."""
        if not self.procs:
            futs = [self.pool.submit(read_one, f) for f in files]
            out: Future = Future()
            left = [len(futs)]
            lock = threading.Lock()

            def done(_):
                with lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:
                    try:
                        out.set_result([f.result() for f in futs])
                    except BaseException as e:
                        out.set_exception(e)

            if not futs:
                out.set_result([])
            for f in futs:
                f.add_done_callback(done)
            return out
        fut: Future = Future()
        parts = [list(files[s:s + self.chunk]) for s in range(0, len(files), self.chunk)]
        slots: list = [None] * len(parts)
        if not parts:
            fut.set_result([])
            return fut
        with self._lock:
            tids = list(range(self._next, self._next + len(parts)))
            self._next += len(parts)
            for k, tid in enumerate(tids):
                self._futures[tid] = (fut, k, slots)
        # outside the lock: a put blocks while the pipe is full, and the collector needs
        # the lock to drain the results that let the workers take more tasks
        for tid, part in zip(tids, parts, strict=True):
            self.tasks.put((tid, self._prefix, part))
        return fut

    def result(self, fut: Future) -> list[FileRead]:
        """Wait for ``fut``; raises if a reader process died meanwhile (never hangs)."""
        while True:
            try:
                return fut.result(timeout=2.0)
            except TimeoutError:
                dead = [p for p in self.procs if not p.is_alive()]
                if not self._collector.is_alive():
                    raise Stage1Error("file reader pool stopped; re-run the command: finished shards are kept"
                                      ) from None
                if dead:
                    hint = (" (SIGBUS: /dev/shm ran out; give it more room, e.g. docker --shm-size 8g, "
                            "or read in threads with --workers 0)" if dead[0].exitcode == -7 else "")
                    raise Stage1Error(f"file reader process {dead[0].name} died (exit code {dead[0].exitcode})"
                                       f"{hint}; re-run the command: finished shards are kept") from None

    def _collect(self) -> None:
        while True:
            msg = self.results.get()
            if msg is None:
                return
            tid, path, meta = msg
            with self._lock:
                fut, k, slots = self._futures.pop(tid)
            try:
                if isinstance(meta, str):
                    raise Stage1Error(f"a file reader process failed: {meta}; "
                                      "re-run the command: finished shards are kept")
                mv = None
                if isinstance(path, bytearray):  # sent inline: /dev/shm was too full
                    mv = memoryview(path)
                elif path is not None:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        size = os.fstat(fd).st_size
                        mv = memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
                    finally:
                        os.close(fd)
                        os.unlink(path)  # the mapping lives on until its last view is dropped
                slots[k] = [FileRead(mv[o:o + n] if reason is None else None, sha, reason, cpu, hw)
                            for o, n, sha, reason, cpu, hw in meta]
            except BaseException as e:
                if not fut.done():
                    fut.set_exception(e)
                continue
            if all(s is not None for s in slots) and not fut.done():
                fut.set_result([r for s in slots for r in s])

    def close(self) -> None:
        if self.procs:
            for _ in self.procs:
                self.tasks.put(None)
            for p in self.procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
            self.results.put(None)
            self._collector.join(timeout=5)
            for tid in list(self._futures):  # cancelled work: remove its files if written
                path = f"{self._prefix}-{tid}"
                if os.path.exists(path):
                    os.unlink(path)
            self.procs = []
        else:
            self.pool.shutdown(wait=False, cancel_futures=True)
