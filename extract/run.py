"""`stage1 extract`: one pass of a frozen backbone over an input list, into cache shards.

The input list is cut into contiguous shards of ``shard_size`` inputs; each shard is
written crash-safely (:class:`cache.ShardWriter`), so re-running the same command
skips finished shards and redoes only the unfinished one. Batches never straddle a
shard, so a resumed run computes exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import os
import platform
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import schemas
from cache.errors import Stage1Error
from cache.format import FORMAT_VERSION, SHARD_SUFFIX, fingerprint_of, short
from cache.reader import read_shard_info
from cache.writer import ShardWriter
from extract.backbone import FEATURE_SETS, Backbone, load_backbone
from extract.batch_decode import BATCH_DECODERS, nvimgcodec, resolve_batch_decoder
from extract.pipeline import auto_batch_size
from extract.preprocess import DecodeError, Preprocessing, load_and_preprocess
from extract.sources import InputList, Item, build_input_list

CONFIG_NAME = "extract.json"
DECODERS = ("auto", *BATCH_DECODERS, "pil")  # --decoder choices


def _default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1)))


@dataclass
class ExtractConfig:
    images: list[str]  # image root directories, one per source
    out: str  # output directory: shard-NNNNN.h5 files + extract.json
    backbone: str  # backbone spec: hf:<id|dir> or timm:<name|dir>
    labels: list[str | None] = field(default_factory=list)  # per source: CSV/JSON, 'folders' or None
    weights: str | None = None  # timm: local weights file
    preprocess: str = "baseline"  # 'baseline' (256 shorter side, crop 224) or 'hf' (224x224)
    image_size: int = 224  # network input side (multiple of 16)
    feature_sets: list[str] = field(default_factory=lambda: list(FEATURE_SETS))  # which sets to cache
    dtype: str = "float16"  # stored feature dtype
    batch_size: int | None = None  # images per decoded batch (None: 64 on a CPU, from free memory on a GPU)
    forward_batch: int | None = None  # images per model forward, dividing batch_size (None: 256 on a GPU, else batch_size)
    shard_size: int = 4096  # inputs per shard file (the unit of resumption)
    workers: int = field(default_factory=_default_workers)  # CPU decode processes; with a GPU decoder: file readers
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    max_failures: str = "1%"  # undecodable inputs tolerated: a count ('10') or a share ('1%')
    decoder: str = "auto"  # 'auto', 'nvimgcodec' (GPU JPEG engines), 'nvjpeg' (SMs), 'pil'; enters the fingerprint
    compile: str = "auto"  # torch.compile the backbone: 'auto' (on a GPU), 'on', 'off'
    # on a GPU, the compiled forward is replayed as one CUDA graph (torch.compile's mode
    # 'reduce-overhead'): one launch per forward instead of one per kernel, so a forward no
    # longer stalls between kernels while a decode thread holds the GIL (benchmarks/NOTES.md)
    cuda_graphs: bool = True
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        if not self.images:
            raise Stage1Error("extract needs at least one --images DIR")
        bad = [s for s in self.feature_sets if s not in FEATURE_SETS]
        if bad or not self.feature_sets:
            raise Stage1Error(f"--feature-sets {bad or self.feature_sets} not supported; choose from {list(FEATURE_SETS)}")
        if self.dtype not in ("float16", "float32"):
            raise Stage1Error(f"--dtype {self.dtype!r}: choose float16 or float32")
        if self.decoder not in DECODERS:
            raise Stage1Error(f"--decoder {self.decoder!r}: choose one of {', '.join(DECODERS)}")
        if self.compile not in ("auto", "on", "off"):
            raise Stage1Error(f"--compile {self.compile!r}: choose auto, on or off")
        for k in ("batch_size", "forward_batch", "shard_size"):
            if getattr(self, k) is not None and int(getattr(self, k)) < 1:
                raise Stage1Error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if self.batch_size is not None and self.forward_batch is not None and self.batch_size % self.forward_batch:
            raise Stage1Error(f"--forward-batch {self.forward_batch} must divide --batch-size {self.batch_size}; "
                              "give a divisor, or leave one of them out")
        failure_limit(self.max_failures, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("progress")
        return d


def failure_limit(spec: str, num_inputs: int) -> int:
    """Number of failures allowed by ``spec`` ('10' or '1.5%') for ``num_inputs`` inputs."""
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            share = float(s[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(np.floor(share / 100.0 * num_inputs))
        n = int(s)
        if n < 0:
            raise ValueError
        return n
    except ValueError:
        raise Stage1Error(f"--max-failures {spec!r}: give a count like '10' or a share like '1%'") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise Stage1Error(f"--device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Stage1Error(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def library_versions(decoder: str | None = None) -> dict[str, str]:
    import h5py
    import PIL
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
           "numpy": np.__version__}
    for mod in ("transformers", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if decoder == "nvimgcodec":
        out["nvimgcodec"] = nvimgcodec().__version__
    return out


def build_provenance(backbone: Backbone, recipe: Preprocessing, cfg: ExtractConfig) -> dict[str, Any]:
    from headlab import __version__

    return {"format_version": FORMAT_VERSION, "backbone": backbone.describe(), "backbone_source": backbone.spec.to_dict(),
            "preprocessing": recipe.to_dict(),
            "feature_dtype": cfg.dtype, "feature_sets": list(cfg.feature_sets),
            "libraries": library_versions(recipe.decoder), "stage1_version": __version__}


class _ImageDataset(torch.utils.data.Dataset):
    """Index -> (index, tensor or None, sha256, failure reason or None)."""

    def __init__(self, items: list[Item], recipe: Preprocessing) -> None:
        self.items = items
        self.recipe = recipe
        self.tf = recipe.transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            x, sha = load_and_preprocess(self.items[i].file, self.recipe, self.tf)
            return i, x, sha, None
        except DecodeError as e:
            return i, None, "", str(e)


def _collate(batch):
    ok = [b for b in batch if b[1] is not None]
    x = torch.stack([b[1] for b in ok]) if ok else None
    return [b[0] for b in ok], x, [b[2] for b in ok], [(b[0], b[3]) for b in batch if b[1] is None]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def shard_ranges(num_inputs: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, num_inputs)) for a in range(0, num_inputs, shard_size)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}{SHARD_SUFFIX}"


def _check_existing(out: str, fingerprint: str, plan_id: str, num_inputs: int, backbone: str) -> None:
    """Refuse to mix: an existing cache in ``out`` must come from the same backbone,
    preprocessing and input list."""
    cfg_path = os.path.join(out, CONFIG_NAME)
    if os.path.exists(cfg_path):
        old = schemas.read_json(cfg_path, "extract_config")
        if old["fingerprint"] != fingerprint:
            raise Stage1Error(
                f"{out}: already holds a cache built with backbone {old['config']['backbone']} and "
                f"preprocessing '{old['config']['preprocess']}' (fingerprint {short(old['fingerprint'])}); "
                f"this run ({backbone}) has fingerprint {short(fingerprint)}; use another --out or delete {out}")
        if old["plan_id"] != plan_id:
            raise Stage1Error(
                f"{out}: already holds a cache of a different input list ({old['num_inputs']} inputs, "
                f"this run has {num_inputs}); use another --out for new inputs, or delete {out}")


def plan_batches(ranges: list[tuple[int, int]], shards: list[int], batch_size: int, forward_batch: int
                 ) -> tuple[list[list[int]], list[int]]:
    """The batches of a run over ``shards`` (indices into ``ranges``), in order, and the shard of each.

    Batches never straddle a shard. The run starts with small batches, two of each size,
    doubling from ``forward_batch`` up to ``batch_size``, so that the model starts after one
    forward's worth of images is decoded rather than a full batch (the first full batch took
    0.6-1.0 s of a 7.4 s ViT-L/16 run over 20,000 files), and the batches behind it keep up
    (doubling at every batch left the model waiting 60-160 ms for the second and third;
    benchmarks/NOTES.md). Every batch starts a multiple of ``forward_batch`` after its
    shard's start, so the model's forwards hold the same images whichever shard a run starts
    from: a resumed run computes what an uninterrupted one would.
    """
    if batch_size % forward_batch:
        raise ValueError(f"forward_batch {forward_batch} does not divide batch_size {batch_size}")
    batches: list[list[int]] = []
    batch_shard: list[int] = []
    size = forward_batch
    for k in shards:
        a, b = ranges[k]
        s0 = a
        while s0 < b:
            batches.append(list(range(s0, min(s0 + size, b))))
            batch_shard.append(k)
            s0 += size
            if len(batches) % 2 == 0:
                size = min(2 * size, batch_size)
    return batches, batch_shard


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def rank_shards(num_shards: int, rank: int, world: int) -> range:
    """The contiguous block of shard indices rank ``rank`` of ``world`` writes."""
    per, extra = divmod(num_shards, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def _choose_decoder(cfg: ExtractConfig, device: torch.device) -> str:
    """The decoder of this run. 'auto' resumes an existing cache with the decoder it was
    started with (the decoder is in the fingerprint) when this machine can run it."""
    if cfg.decoder == "auto":
        try:
            with open(os.path.join(cfg.out, CONFIG_NAME)) as fh:
                started = json.load(fh)["provenance"]["preprocessing"]["decoder"]
        except (OSError, ValueError, KeyError, TypeError):
            started = None
        if started in BATCH_DECODERS and device.type != "cuda":
            raise Stage1Error(f"{cfg.out}: this cache was started with --decoder {started}, which needs a CUDA "
                              "device (the decoder is part of the fingerprint); resume it on a GPU, or use another --out")
        if started in BATCH_DECODERS:
            try:
                return resolve_batch_decoder(started, device)
            except Stage1Error:
                pass
        elif started == "pil":
            return "pil"
    return resolve_batch_decoder(cfg.decoder, device)


def _quietly(fn) -> None:
    """Run ``fn`` in a helper thread; an error is left for the pipeline's own call to raise."""
    try:
        fn()
    except Exception:
        pass


def more_hardware_queues(n: int = 32) -> bool:
    """Let CUDA give each stream a hardware work queue of its own (``CUDA_DEVICE_MAX_CONNECTIONS``,
    default 8), unless the variable is set or CUDA is already initialised; True if set here.

    The decoder's internal streams (14 for nvImageCodec's JPEG engines) plus the model's and
    the resize's streams outnumber 8 queues; streams sharing a queue with the model waited
    behind all model work already submitted, and the decoder waits on the host for each
    image's colour conversion: decoding and the model took turns (benchmarks/NOTES.md, the
    trace). With 32 queues one decode thread feeding ViT-B/16 went from 3,017 to 4,584 img/s."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return False
    if torch.cuda.is_initialized():
        warnings.warn("CUDA is already initialised, so extraction runs with 8 hardware queues; decoding "
                      "and the model may take turns. Set CUDA_DEVICE_MAX_CONNECTIONS=32 before CUDA starts.",
                      stacklevel=2)
        return False
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = str(n)
    return True


def narrow_to_local_gpu(device: str = "auto") -> bool:
    """Under torchrun, show each process only its own GPU (``CUDA_VISIBLE_DEVICES``), before
    CUDA starts; True if narrowed here, and the process's GPU is then ``cuda:0``.

    torch's compile caches are keyed by the device, so a rank on ``cuda:1`` compiled its
    model again (48 s against rank 0's 11 s on two H200s, benchmarks/NOTES.md); narrowed,
    every rank looks up the same entries. Left alone when: not distributed, an explicit
    ``cuda:N`` or ``cpu`` was asked for, CUDA has already started (the variable would be
    ignored), or there are fewer GPUs than local ranks (ranks then share GPUs as before)."""
    _, world, local_rank = dist_info()
    if world == 1 or device not in ("auto", "cuda") or torch.cuda.is_initialized():
        return False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    else:  # NVML's count: does not start CUDA
        ids = [str(i) for i in range(torch.cuda.device_count())]
    if len(ids) < 2 or local_rank >= len(ids):
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank]
    return True


def _local_cuda_device(local_rank: int, world: int) -> torch.device:
    """The device of this process when none was named: the first visible one when this
    process was narrowed to its GPU (or runs alone), else ``cuda:LOCAL_RANK``."""
    if world == 1:
        return torch.device("cuda", torch.cuda.current_device())
    # the driver's own count: it reflects the narrowing only if CUDA started after it
    if torch._C._cuda_getDeviceCount() == 1:
        return torch.device("cuda", 0)
    return torch.device("cuda", local_rank)


def run_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every input; returns a summary dict.

    Resumable: finished shards in ``cfg.out`` are kept and skipped. Under ``torchrun``
    each rank writes only its own contiguous block of shards (no sample padded or
    duplicated). Raises :class:`Stage1Error` on bad input (nothing already written is
    touched).
    """
    cfg.validate()
    if cfg.device != "cpu":
        narrow_to_local_gpu(cfg.device)
        more_hardware_queues()
    readers = None
    if resolve_device(cfg.device).type == "cuda" and cfg.decoder != "pil" and cfg.workers > 0:
        # The reader processes start now, while this process is small: a fork copies the
        # page tables of the parent's memory, so forking them after the model is loaded
        # and compiled made the first batch seconds late (benchmarks/reader_start.py).
        from extract.readers import ReaderPool

        readers = ReaderPool(cfg.workers, threads=4)
    helpers: list[threading.Thread] = []
    try:
        return _run_extract(cfg, readers, helpers)
    finally:
        # the decoders' warm-up thread ends before this returns: a process that exits while
        # it is inside nvImageCodec aborts ("terminate called without an active exception")
        for th in helpers:
            th.join()
        if readers is not None:
            readers.close()


def _run_extract(cfg: ExtractConfig, readers, helpers: list[threading.Thread]) -> dict[str, Any]:
    from headlab import __version__

    rank, world, local_rank = dist_info()
    inputs: InputList = build_input_list(cfg.images, cfg.labels)
    plan_id = inputs.plan_id
    n = len(inputs.items)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise Stage1Error(f"{cfg.out}: --out must be a directory (it is a file)")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = _local_cuda_device(local_rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # events and streams follow the current device
    decoder = _choose_decoder(cfg, device)
    recipe = dataclasses.replace(Preprocessing.from_preset(cfg.preprocess, image_size=cfg.image_size),
                                 decoder=decoder)
    backbone = load_backbone(cfg.backbone, weights=cfg.weights)
    provenance = build_provenance(backbone, recipe, cfg)
    fingerprint = fingerprint_of(provenance)
    _check_existing(cfg.out, fingerprint, plan_id, n, cfg.backbone)
    os.makedirs(cfg.out, exist_ok=True)

    ranges = shard_ranges(n, cfg.shard_size)
    mine = rank_shards(len(ranges), rank, world)
    done, pending = [], []
    for k, (a, b) in enumerate(ranges):
        path = os.path.join(cfg.out, shard_name(k))
        if os.path.exists(path):
            info = read_shard_info(path)
            if info.fingerprint != fingerprint or info.plan_id != plan_id:
                raise Stage1Error(f"{path}: belongs to another extraction (fingerprint "
                                  f"{short(info.fingerprint)}, this run {short(fingerprint)}); use another --out")
            if (info.input_start, info.input_stop) != (a, b):
                raise Stage1Error(f"{path}: covers inputs {info.input_start}..{info.input_stop - 1}, but "
                                  f"--shard-size {cfg.shard_size} puts {a}..{b - 1} there; re-run with the "
                                  "--shard-size the cache was started with")
            done.append(k)
        elif k in mine:
            pending.append(k)
    if rank == 0:
        schemas.write_json({"stage1_version": __version__, "command": "extract", "config": cfg.to_dict(),
                            "fingerprint": fingerprint, "plan_id": plan_id, "num_inputs": n,
                            "num_shards": len(ranges), "provenance": provenance},
                           os.path.join(cfg.out, CONFIG_NAME), "extract_config")

    preprocessor = None
    sized = threading.Event()  # set once the batch size is chosen
    if pending and decoder in BATCH_DECODERS:
        # The batch decoder (up to a second to make) is made, and tried on the first input,
        # while the model moves and compiles.
        from extract.batch_decode import BatchPreprocessor

        preprocessor = BatchPreprocessor(recipe, device, decoder=decoder)
        first = inputs.items[ranges[pending[0]][0]].file

        def warm_up() -> None:
            try:  # the first input: its size is the likeliest one
                with open(first, "rb") as fh:
                    sample = fh.read()
            except OSError:  # the pipeline reports it
                sample = None
            preprocessor.warm_up(sample, decode=False)  # the decoders, their memory sized for the sample
            if sample is not None:
                sized.wait()  # its decode and resize take memory: not while the batch size is chosen
                preprocessor.warm_up(sample)

        helpers.append(threading.Thread(target=_quietly, args=(warm_up,), name="stage1-decoder", daemon=True))
        helpers[-1].start()
    model_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        backbone = backbone.to(device=device, dtype=model_dtype)
        batch_size = cfg.batch_size or (auto_batch_size(backbone, recipe.output_size, device, model_dtype)
                                        if device.type == "cuda" else 64)
        # The model's static shape: 256 images are as fast a forward as more on an H200
        # (compiled ViT-B/16 9,733 img/s at 256, 9,735 at 512; ViT-L/16 3,253 and 3,289;
        # benchmarks/results/extract_bench.json), and a small first batch starts it sooner
        # (plan_batches).
        forward_batch = cfg.forward_batch or (256 if device.type == "cuda" else batch_size)
        if cfg.batch_size is None:  # sized here: a multiple of the forward's batch
            forward_batch = min(forward_batch, batch_size)
            batch_size = batch_size // forward_batch * forward_batch
        elif batch_size % forward_batch:  # --batch-size given, not a multiple of the default forward
            forward_batch = batch_size
    finally:
        sized.set()
    forward = backbone
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    graphs = compile_on and cfg.cuda_graphs and device.type == "cuda"
    t_compile = time.perf_counter()
    if compile_on:
        compiled = torch.compile(backbone, dynamic=False, mode="reduce-overhead" if graphs else None)

        def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
            if graphs:  # a new replay: the last one's outputs (copied out by now) may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(x)

        if pending:  # compile now, before the data pipeline starts, so throughput is measured honestly
            # made outside inference mode, as the batches are: an inference tensor has other
            # dispatch keys, and the compiled model's guards sent the first batch to a second
            # compile (2-4 s inside the run when the compile cache was cold; benchmarks/NOTES.md)
            x0 = torch.zeros(forward_batch, 3, recipe.output_size, recipe.output_size, device=device,
                             dtype=model_dtype)
            with torch.inference_mode():
                # with CUDA graphs: a warm-up run, the recording, then a replay, all before the loop
                for _ in range(3 if graphs else 1):
                    forward(x0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    compile_seconds = time.perf_counter() - t_compile
    batches, batch_shard = plan_batches(ranges, pending, batch_size, forward_batch)
    n_pending = sum(ranges[k][1] - ranges[k][0] for k in pending)

    if decoder in BATCH_DECODERS:
        from extract.pipeline import gpu_batches

        # The decoders' trial on the first input ends before the batches start: when the
        # compile is quick (torch's cache) it could otherwise still be waiting for a decoder
        # well into the run, and it only helps before the first batch.
        for th in helpers:
            th.join(timeout=60)

        source = gpu_batches(inputs.items, batches, recipe, device, decoder=decoder,
                             readers=readers if readers is not None else cfg.workers, threads=4,
                             preprocessor=preprocessor)
    else:
        source = iter(torch.utils.data.DataLoader(
            _ImageDataset(inputs.items, recipe), batch_sampler=batches, num_workers=cfg.workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
            persistent_workers=False, prefetch_factor=4 if cfg.workers else None))
    from tqdm.auto import tqdm

    from extract.pipeline import AsyncWriter

    store = np.dtype(cfg.dtype)
    torch_store = torch.float16 if cfg.dtype == "float16" else torch.float32
    state: dict[str, Any] = {"writer": None}
    reasons: collections.Counter[str] = collections.Counter()
    rows_written = failures_new = 0
    current = -1
    bar = tqdm(total=n_pending, unit="img", desc="extract" if world == 1 else f"extract rank {rank}",
               disable=not cfg.progress or n_pending == 0, dynamic_ncols=True, smoothing=0.1)
    io = AsyncWriter() if device.type == "cuda" else None
    submit = io.submit if io is not None else (lambda fn, *a: fn(*a))

    def open_shard(k: int) -> None:
        a, b = ranges[k]
        state["writer"] = ShardWriter(os.path.join(cfg.out, shard_name(k)),
                                      feature_dims={s: backbone.embed_dim for s in cfg.feature_sets},
                                      provenance=provenance, fingerprint=fingerprint,
                                      plan={"plan_id": plan_id, "input_start": a, "input_stop": b, "num_inputs": n},
                                      classes=inputs.classes, feature_dtype=cfg.dtype)

    def finish_shard() -> None:
        state["writer"].finish()
        state["writer"] = None

    def add_failures(failed) -> None:
        for i, reason in failed:
            state["writer"].add_failure(i, inputs.items[i].path, reason)

    def add_rows(idx, shas, host: dict[str, torch.Tensor], event) -> None:
        if event is not None:
            event.synchronize()
        items = [inputs.items[i] for i in idx]
        state["writer"].add_rows(
            features={s: host[s].numpy().astype(store, copy=False) for s in cfg.feature_sets},
            labels=[it.label for it in items], paths=[it.path for it in items], sha256=shas,
            source=[it.source for it in items], group=[it.group or h for it, h in zip(items, shas, strict=True)],
            index=idx)

    # The model runs on a stream of its own, never the legacy default stream: work on that
    # one waits for all work on blocking streams (the JPEG decoders' internal ones among
    # them), which serialised decoding with the model (benchmarks/NOTES.md).
    model_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if model_stream is not None:  # after the weights' copies and the compile, queued on the default stream
        model_stream.wait_stream(torch.cuda.current_stream(device))
    stream_ctx = torch.cuda.stream(model_stream) if model_stream is not None else contextlib.nullcontext()
    # Everything made so far (the input list, the model, the compiler's caches: millions of
    # objects) is moved out of the collector's view: a full collection over them held every
    # pipeline thread for 400-1,100 ms in ViT-B/16 runs (benchmarks/NOTES.md). Undone at the
    # end, unless objects were frozen before (by the caller, or a library: 375 were, on the
    # GPU machine): those stay frozen, and so do these with them.
    on_gpu = device.type == "cuda"
    host_dtype = torch_store if on_gpu else torch.float32  # features on the host, before the writer
    unfreeze_after = gc.get_freeze_count() == 0
    gc.freeze()
    t0 = time.perf_counter()
    t_first = None
    try:
        with stream_ctx:
            for (idx, x, shas, failed), k in zip(source, batch_shard, strict=True):
                if k != current:
                    if current >= 0:
                        submit(finish_shard)
                    submit(open_shard, k)
                    current = k
                if failed:
                    submit(add_failures, failed)
                    for _, reason in failed:
                        reasons[reason.split(":")[0]] += 1
                    failures_new += len(failed)
                if idx:
                    m = len(idx)
                    x = x.to(device, non_blocking=True).to(model_dtype)
                    if compile_on and m % forward_batch:  # static shapes: pad the last forward
                        pad = forward_batch - m % forward_batch
                        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
                    host = {s: torch.empty((m, backbone.embed_dim), dtype=host_dtype, pin_memory=on_gpu)
                            for s in cfg.feature_sets}
                    with torch.inference_mode():
                        for c in range(0, m, forward_batch):
                            feats = forward(x[c:c + forward_batch])
                            e = min(c + forward_batch, m)
                            for s in cfg.feature_sets:  # a pinned buffer: the copy does not block
                                host[s][c:e].copy_(feats[s][:e - c].to(host[s].dtype), non_blocking=on_gpu)
                            del feats
                    event = None
                    if on_gpu:
                        event = torch.cuda.Event()
                        event.record()
                    submit(add_rows, idx, shas, host, event)
                    rows_written += m
                if t_first is None:
                    t_first = time.perf_counter()
                bar.update(len(idx) + len(failed))
            if current >= 0:
                submit(finish_shard)
            if io is not None:
                io.close()
                io = None
    except BaseException:
        if io is not None:
            try:
                io.close()
            except BaseException:
                pass
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    finally:
        bar.close()
        if unfreeze_after:
            gc.unfreeze()
    seconds = time.perf_counter() - t0
    steady = time.perf_counter() - t_first if t_first is not None else 0.0
    first_batch = len(batches[0]) if batches else 0

    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    failures_old = 0
    for k in done:
        import h5py

        with h5py.File(os.path.join(cfg.out, shard_name(k)), "r") as f:
            failures_old += int(f["failures/index"].shape[0])
    total_failures = failures_new + failures_old
    limit = failure_limit(cfg.max_failures, n)
    return {
        "out": cfg.out, "inputs": n, "shards": len(ranges), "shards_written": len(pending),
        "shards_skipped": len(done), "rows_written": rows_written, "failures": total_failures,
        "failure_reasons": dict(reasons), "max_failures": limit, "failures_exceeded": total_failures > limit,
        "seconds": round(seconds, 3), "images_per_s": round(n_pending / seconds, 1) if seconds > 0 and n_pending else None,
        "steady_images_per_s": round((n_pending - first_batch) / steady, 1) if steady > 0 else None,
        "first_batch_seconds": round(t_first - t0, 3) if t_first is not None else None,
        "compile_seconds": round(compile_seconds, 3),
        "batch_size": batch_size, "forward_batch": forward_batch, "decoder": decoder, "compiled": compile_on,
        "cuda_graphs": graphs,
        "rank": rank, "world_size": world,
        "device": str(device), "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES") if device.type == "cuda" else None,
        "fingerprint": fingerprint, "backbone": cfg.backbone,
    }
