"""Frozen DINOv3 backbones from spec strings, and the features we cache from them.

Specs
-----
``hf:<hub id or local dir>``
    transformers ``AutoModel`` (``DINOv3ViTModel``; DINOv2 with/without registers also
    work), loaded with ``local_files_only=True``: nothing is downloaded at run time.
``timm:<model name>``
    timm model (``vit_*_patch16_dinov3``) with weights from ``weights=FILE`` (a
    safetensors/pth file) or from timm's local cache.
``timm:<local dir>``
    a directory saved by ``timm.models.save_for_hf`` (``config.json`` + weights).

Feature sets (token layout ``[CLS, registers..., patches...]``, after the final norm):
``cls`` is the CLS token; ``patch_mean`` the mean of the patch tokens, registers excluded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from cache.errors import Stage1Error

FEATURE_SETS = ("cls", "patch_mean")
_HF_TYPES = {"dinov3_vit", "dinov2", "dinov2_with_registers"}


@dataclass(frozen=True)
class BackboneSpec:
    kind: str  # "hf" or "timm"
    name: str  # hub id, timm model name, or local directory
    weights: str | None = None  # timm only: local weights file

    @classmethod
    def parse(cls, spec: str, *, weights: str | None = None) -> BackboneSpec:
        kind, sep, name = spec.partition(":")
        if not sep or kind not in ("hf", "timm") or not name:
            raise Stage1Error(
                f"unknown backbone spec {spec!r}; use 'hf:<hub id or local dir>' "
                "(e.g. hf:facebook/dinov3-vitl16-pretrain-lvd1689m) or 'timm:<name or local dir>' "
                "(e.g. timm:vit_large_patch16_dinov3.lvd1689m with --weights FILE)")
        if weights is not None and kind != "timm":
            raise Stage1Error(f"--weights {weights!r} is for timm: backbones; an hf: spec takes a local directory")
        if weights is not None and not os.path.isfile(weights):
            raise Stage1Error(f"{weights}: backbone weights file not found; check --weights")
        return cls(kind, name, weights)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": str(self), "weights_file": os.path.basename(self.weights) if self.weights else None}


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order.

    Identifies the weights actually loaded, whatever file format they came from.
    """
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Backbone(torch.nn.Module):
    """A loaded frozen backbone that maps ``(B, 3, H, W)`` images to cached feature sets."""

    def __init__(self, spec: BackboneSpec, model: torch.nn.Module, *, library: str,
                 num_prefix_tokens: int, embed_dim: int, patch_size: int, arch: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.library = library
        self.num_prefix_tokens = num_prefix_tokens  # CLS + registers
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.arch = arch
        self.weights_sha256 = state_dict_sha256(self.model)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + R + P, D)`` final-normed tokens."""
        if self.library == "hf":
            return self.model(pixel_values=pixels).last_hidden_state
        return self.model.forward_features(pixels)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (B, D), "patch_mean": (B, D)}``."""
        tok = self.tokens(pixels)
        return {"cls": tok[:, 0], "patch_mean": tok[:, self.num_prefix_tokens:].mean(dim=1)}

    def describe(self) -> dict[str, Any]:
        """What identifies the model (enters the fingerprint). Where it was loaded from
        does not: the same weights moved to another directory give the same features."""
        return {"library": self.library, "weights_sha256": self.weights_sha256,
                "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "num_prefix_tokens": self.num_prefix_tokens, "arch": self.arch}


def _load_hf(spec: BackboneSpec) -> Backbone:
    try:
        import transformers
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise Stage1Error("hf: backbones need transformers; install with: pip install 'stage1-pro[extract]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(spec.name, local_files_only=True)
    except (OSError, ValueError) as e:
        where = "directory" if os.path.isdir(spec.name) else "hub id"
        raise Stage1Error(
            f"backbone {spec}: cannot load a transformers config from {where} {spec.name!r} "
            f"({str(e).splitlines()[0][:160]}); nothing is downloaded at run time: pass a local "
            "directory holding config.json + model.safetensors, or pre-fetch the hub id into the HF cache") from None
    if config.model_type not in _HF_TYPES:
        raise Stage1Error(f"backbone {spec}: model type {config.model_type!r} is not supported; "
                          f"use a DINOv3 ViT (model types: {sorted(_HF_TYPES)})")
    model = AutoModel.from_pretrained(spec.name, local_files_only=True, dtype=torch.float32)
    regs = int(getattr(config, "num_register_tokens", 0) or 0)
    arch = {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_register_tokens": regs}
    return Backbone(spec, model, library="hf", num_prefix_tokens=1 + regs, embed_dim=int(config.hidden_size),
                    patch_size=int(config.patch_size), arch=arch)


def _load_timm(spec: BackboneSpec) -> Backbone:
    import timm

    name = spec.name
    kwargs: dict[str, Any] = {"num_classes": 0}
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise Stage1Error(f"backbone {spec}: {name} has no config.json; save it with timm.models.save_for_hf")
        model_name, kwargs["pretrained"] = "local-dir:" + os.path.abspath(name), True
    else:
        base = name.split(".")[0]
        if not timm.is_model(base):
            near = timm.list_models("*dinov3*")
            raise Stage1Error(f"backbone {spec}: unknown timm model {name!r}; DINOv3 models in timm: "
                              f"{', '.join(near[:8])}")
        model_name = name
        if spec.weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(spec.weights)})
        else:
            kwargs["pretrained"] = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = timm.create_model(model_name, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise Stage1Error(f"backbone {spec}: timm could not load weights ({str(e).splitlines()[0][:160]}); "
                          "nothing is downloaded at run time: pass --weights FILE or a local save_for_hf "
                          "directory") from None
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_features"):
        raise Stage1Error(f"backbone {spec}: {type(model).__name__} is not a ViT with prefix tokens")
    arch = {"architecture": model.pretrained_cfg.get("architecture", name), "embed_dim": int(model.embed_dim),
            "depth": len(getattr(model, "blocks", [])), "num_prefix_tokens": int(model.num_prefix_tokens)}
    patch = model.patch_embed.patch_size
    return Backbone(spec, model, library="timm", num_prefix_tokens=int(model.num_prefix_tokens),
                    embed_dim=int(model.embed_dim), patch_size=int(patch[0] if isinstance(patch, tuple | list) else patch),
                    arch=arch)


def load_backbone(spec: str | BackboneSpec, *, weights: str | None = None) -> Backbone:
    """Load a frozen backbone on the CPU in float32; move it with ``.to(device)``."""
    if isinstance(spec, str):
        spec = BackboneSpec.parse(spec, weights=weights)
    return _load_hf(spec) if spec.kind == "hf" else _load_timm(spec)
