"""`stage1 extract`: one pass of a frozen backbone over an input list, into cache shards.

The input list is cut into contiguous shards of ``shard_size`` inputs; each shard is
written crash-safely (:class:`cache.ShardWriter`), so re-running the same command
skips finished shards and redoes only the unfinished one. Batches never straddle a
shard, so a resumed run computes exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import platform
import time
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
from extract.preprocess import DecodeError, Preprocessing, load_and_preprocess
from extract.sources import InputList, Item, build_input_list

CONFIG_NAME = "extract.json"


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
    batch_size: int = 64  # images per forward pass
    shard_size: int = 4096  # inputs per shard file (the unit of resumption)
    workers: int = field(default_factory=_default_workers)  # decode processes (0 = in-process)
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    max_failures: str = "1%"  # undecodable inputs tolerated: a count ('10') or a share ('1%')
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        if not self.images:
            raise Stage1Error("extract needs at least one --images DIR")
        bad = [s for s in self.feature_sets if s not in FEATURE_SETS]
        if bad or not self.feature_sets:
            raise Stage1Error(f"--feature-sets {bad or self.feature_sets} not supported; choose from {list(FEATURE_SETS)}")
        if self.dtype not in ("float16", "float32"):
            raise Stage1Error(f"--dtype {self.dtype!r}: choose float16 or float32")
        for k in ("batch_size", "shard_size"):
            if int(getattr(self, k)) < 1:
                raise Stage1Error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
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


def library_versions() -> dict[str, str]:
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
    return out


def build_provenance(backbone: Backbone, recipe: Preprocessing, cfg: ExtractConfig) -> dict[str, Any]:
    from headlab import __version__

    return {"format_version": FORMAT_VERSION, "backbone": backbone.describe(), "backbone_source": backbone.spec.to_dict(),
            "preprocessing": recipe.to_dict(),
            "feature_dtype": cfg.dtype, "feature_sets": list(cfg.feature_sets),
            "libraries": library_versions(), "stage1_version": __version__}


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


def run_extract(cfg: ExtractConfig) -> dict[str, Any]:
    """Extract features for every input; returns a summary dict.

    Resumable: finished shards in ``cfg.out`` are kept and skipped. Raises
    :class:`Stage1Error` on bad input (nothing already written is touched).
    """
    from headlab import __version__

    cfg.validate()
    recipe = Preprocessing.from_preset(cfg.preprocess, image_size=cfg.image_size)
    inputs: InputList = build_input_list(cfg.images, cfg.labels)
    plan_id = inputs.plan_id
    n = len(inputs.items)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise Stage1Error(f"{cfg.out}: --out must be a directory (it is a file)")
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, weights=cfg.weights)
    provenance = build_provenance(backbone, recipe, cfg)
    fingerprint = fingerprint_of(provenance)
    _check_existing(cfg.out, fingerprint, plan_id, n, cfg.backbone)
    os.makedirs(cfg.out, exist_ok=True)

    ranges = shard_ranges(n, cfg.shard_size)
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
        else:
            pending.append(k)
    schemas.write_json({"stage1_version": __version__, "command": "extract", "config": cfg.to_dict(),
                        "fingerprint": fingerprint, "plan_id": plan_id, "num_inputs": n,
                        "num_shards": len(ranges), "provenance": provenance},
                       os.path.join(cfg.out, CONFIG_NAME), "extract_config")

    batches, batch_shard = [], []
    for k in pending:
        a, b = ranges[k]
        for s in range(a, b, cfg.batch_size):
            batches.append(list(range(s, min(s + cfg.batch_size, b))))
            batch_shard.append(k)
    n_pending = sum(ranges[k][1] - ranges[k][0] for k in pending)

    backbone = backbone.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(inputs.items, recipe), batch_sampler=batches, num_workers=cfg.workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    reasons: collections.Counter[str] = collections.Counter()
    rows_written = failures_new = 0
    writer: ShardWriter | None = None
    current = -1
    bar = tqdm(total=n_pending, unit="img", desc="extract", disable=not cfg.progress or n_pending == 0,
               dynamic_ncols=True, smoothing=0.1)
    try:
        for (idx, x, shas, failed), k in zip(loader, batch_shard, strict=True):
            if k != current:
                if writer is not None:
                    writer.finish()
                a, b = ranges[k]
                writer = ShardWriter(os.path.join(cfg.out, shard_name(k)),
                                     feature_dims={s: backbone.embed_dim for s in cfg.feature_sets},
                                     provenance=provenance, fingerprint=fingerprint,
                                     plan={"plan_id": plan_id, "input_start": a, "input_stop": b, "num_inputs": n},
                                     classes=inputs.classes, feature_dtype=cfg.dtype)
                current = k
            for i, reason in failed:
                writer.add_failure(i, inputs.items[i].path, reason)
                reasons[reason.split(":")[0]] += 1
            failures_new += len(failed)
            if idx:
                with torch.inference_mode(), autocast:
                    feats = backbone(x.to(device, non_blocking=True))
                items = [inputs.items[i] for i in idx]
                writer.add_rows(
                    features={s: feats[s].float().cpu().numpy() for s in cfg.feature_sets},
                    labels=[it.label for it in items], paths=[it.path for it in items], sha256=shas,
                    source=[it.source for it in items], group=[it.group or h for it, h in zip(items, shas, strict=True)],
                    index=idx)
                rows_written += len(idx)
            bar.update(len(idx) + len(failed))
        if writer is not None:
            writer.finish()
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

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
        "device": str(device), "fingerprint": fingerprint, "backbone": cfg.backbone,
    }
