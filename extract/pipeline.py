"""The GPU extraction pipeline: read -> decode -> preprocess -> model -> write, overlapped.

* file reads, sha256 and JPEG header checks in worker processes, bytes handed back
  through shared memory (:mod:`extract.readers`), off the GIL of the decode and model
  threads;
* batched JPEG decode (the GPU's JPEG engines through nvImageCodec, or nvJPEG) +
  resize/crop/normalise on the GPU in producer threads, each on its own CUDA stream, a
  few batches ahead (:mod:`extract.batch_decode`); odd files are decoded per image on
  the CPU in a thread pool, never stopping the batch;
* the model in bf16, optionally ``torch.compile``d, on a static batch shape (the last
  batch is padded);
* features copied to pinned host memory without blocking and written to HDF5 by a
  writer thread, so the GPU never waits on the disk.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from extract.batch_decode import BatchPreprocessor
from extract.mempool import trim_pool
from extract.preprocess import DecodeError, Preprocessing, decode_image
from extract.readers import ReaderPool
from extract.sources import Item

_DONE = object()  # AsyncWriter's stop marker


def _cpu_decode(data: bytes, recipe: Preprocessing, tf) -> tuple[torch.Tensor | None, str | None]:
    try:
        return tf(decode_image(data, exif_transpose=recipe.exif_transpose)), None
    except DecodeError as e:
        return None, str(e)


def gpu_batches(items: Sequence[Item], batches: Sequence[list[int]], recipe: Preprocessing, device: torch.device,
                *, decoder: str = "nvjpeg", readers: int | ReaderPool = 8, threads: int = 8, decoders: int = 4,
                prefetch: int = 6, preprocessor: BatchPreprocessor | None = None, first_alone: bool = False
                ) -> Iterator[tuple[list[int], torch.Tensor | None, list[str], list[tuple[int, str]]]]:
    """Yield ``(indices, x on device, sha256s, failures)`` per batch, in order.

    ``decoders`` threads prepare batches concurrently (each on its own CUDA stream), up to
    ``prefetch`` batches ahead of the consumer; reads, hashing and header checks run in
    ``readers`` worker processes (:mod:`extract.readers`; threads where that is not
    possible), or in a :class:`ReaderPool` the caller made (and closes); odd files are
    decoded on the CPU in a pool of ``threads``. ``decoder``: the batch decoder
    (:data:`extract.batch_decode.BATCH_DECODERS`); ``preprocessor``: a
    :class:`BatchPreprocessor` to use instead of a default one. Free decoders go to the
    earliest batch waiting (:class:`extract.batch_decode.DecoderPool`). ``first_alone``:
    the other batches start only once the first is decoded, so that it has the decoders
    (and the JPEG engines they share) to itself; off by default: it gets the first batch
    to the model sooner (0.4-0.6 s instead of 0.7-0.9 s for ViT-L/16), but the second then
    comes late, and in A/B runs ViT-B/16 lost 14 % files to cache on average with it
    (benchmarks/NOTES.md).
    """
    bp = preprocessor or BatchPreprocessor(recipe, device, decoder=decoder)
    tf = recipe.transform()
    own_reader = not isinstance(readers, ReaderPool)
    reader = ReaderPool(readers, threads=threads) if own_reader else readers
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage1-cpu-decode")
    dec = ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="stage1-decode")
    local = threading.local()
    reads: dict[int, list] = {}
    first_done = threading.Event()

    def submit_reads(bi: int) -> None:
        if bi < len(batches):
            reads[bi] = reader.submit([items[i].file for i in batches[bi]])

    def prepare(bi: int):
        if bi == 0:
            try:
                return _prepare(bi)
            finally:  # also when it fails: the others go on (and the consumer sees the error)
                first_done.set()
        if first_alone:
            first_done.wait()
        return _prepare(bi)

    def _prepare(bi: int):
        b = batches[bi]
        got = reader.result(reads.pop(bi))
        failed = [(i, r.reason) for i, r in zip(b, got, strict=True) if r.reason is not None]
        ok = [(i, r) for i, r in zip(b, got, strict=True) if r.reason is None]
        if device.type == "cuda" and not hasattr(local, "stream"):
            local.stream = torch.cuda.Stream(device)
        stream = getattr(local, "stream", None)
        with torch.cuda.stream(stream) if stream is not None else _null():
            imgs, cpu_pos = bp.decode([r.data for _, r in ok], cpu=[r.cpu for _, r in ok],
                                      sizes=[r.size for _, r in ok], priority=bi)
            if bi == 0:  # its resize overlaps the next batches' decode
                first_done.set()
            cpu_jobs = {p: pool.submit(_cpu_decode, bytes(ok[p][1].data), recipe, tf) for p in cpu_pos}
            gpu_pos = [p for p in range(len(ok)) if p not in cpu_jobs]
            x = bp.transform([imgs[p] for p in gpu_pos]) if gpu_pos else None
            parts = {}
            for p, job in cpu_jobs.items():
                t, reason = job.result()
                if t is None:
                    failed.append((ok[p][0], reason))
                else:
                    parts[p] = t
            order = sorted(gpu_pos + list(parts))
            if parts:
                full = torch.empty((len(order), 3, recipe.output_size, recipe.output_size), device=device)
                pos = {p: k for k, p in enumerate(order)}
                if gpu_pos:
                    full[[pos[p] for p in gpu_pos]] = x
                full[[pos[p] for p in parts]] = torch.stack([parts[p] for p in parts]).to(device)
                x = full
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        return [ok[p][0] for p in order], x, [ok[p][1].sha256 for p in order], sorted(failed), event

    jobs: dict[int, Any] = {}
    try:
        for bi in range(min(prefetch + 2, len(batches))):
            submit_reads(bi)
        dec.submit(bp.warm_up)  # the decoder is made while the first files are read (if not already)
        for bi in range(min(prefetch, len(batches))):
            jobs[bi] = dec.submit(prepare, bi)
        for bi in range(len(batches)):
            idx, x, shas, failed, event = jobs.pop(bi).result()
            nxt = bi + prefetch
            submit_reads(nxt + 2)
            if nxt < len(batches):
                jobs[nxt] = dec.submit(prepare, nxt)
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                if x is not None:
                    x.record_stream(torch.cuda.current_stream(device))
            yield idx, x, shas, failed
    finally:
        for j in jobs.values():
            j.cancel()
        dec.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=False, cancel_futures=True)
        if bp.decoder == "nvimgcodec" and bp.keep_pool:
            # the decoded images' memory, kept by the pool while decoding; a CUDA error here
            # must not hide the one that ended the loop
            with contextlib.suppress(RuntimeError):
                trim_pool(device)
        if own_reader:
            reader.close()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


class AsyncWriter:
    """Runs shard writes on a thread: ``submit(fn, *args)`` in order; errors re-raised."""

    def __init__(self, depth: int = 8) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.th = threading.Thread(target=self._run, name="stage1-write", daemon=True)
        self.th.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is _DONE:
                return
            if self.error is not None:
                continue
            fn, args = job
            try:
                fn(*args)
            except BaseException as e:
                self.error = e

    def submit(self, fn, *args: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, args))

    def close(self) -> None:
        self.q.put(_DONE)
        self.th.join()
        if self.error is not None:
            raise self.error


def auto_batch_size(backbone: torch.nn.Module, image_size: int, device: torch.device, dtype: torch.dtype,
                    *, cap: int = 512, share: float = 0.6) -> int:
    """Largest batch (multiple of 32, <= cap) whose activations fit ``share`` of free memory,
    from the peak memory of a probe forward pass of 8 images. The cap: batches of 512 images
    decoded gave 1-6 % more images/s than 1,024 in A/B runs on an H200, with forwards of 256
    (benchmarks/NOTES.md), and half the decoded images' memory in flight."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        backbone(torch.zeros(8, 3, image_size, image_size, device=device, dtype=dtype))
    torch.cuda.synchronize(device)
    per_image = max((torch.cuda.max_memory_allocated(device) - base) / 8, 1)
    free, _ = torch.cuda.mem_get_info(device)
    n = int(share * free / per_image)
    return max(32, min(cap, n // 32 * 32))
