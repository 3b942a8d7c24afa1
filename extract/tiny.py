"""Tiny random-init DINOv3 backbones, saved locally, for the demo and the tests.

Their features are untrained: they exercise the real loading and extraction code
(transformers ``DINOv3ViTModel`` / timm's dinov3 ``Eva``), not the quality of DINOv3.
"""

from __future__ import annotations

import os

import torch

TINY = {"hidden": 64, "heads": 4, "layers": 2, "intermediate": 128, "registers": 4}


def save_tiny_hf(directory: str, *, seed: int = 0) -> str:
    """Save a tiny random-init transformers DINOv3 ViT to ``directory``; returns its spec."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(hidden_size=TINY["hidden"], num_attention_heads=TINY["heads"],
                             num_hidden_layers=TINY["layers"], intermediate_size=TINY["intermediate"],
                             num_register_tokens=TINY["registers"], image_size=224, patch_size=16)
    DINOv3ViTModel(config).save_pretrained(directory)
    return f"hf:{os.path.abspath(directory)}"


def save_tiny_timm(directory: str, *, seed: int = 0) -> str:
    """Save a tiny random-init timm ``vit_small_patch16_dinov3`` variant (``save_for_hf``)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    args = {"embed_dim": TINY["hidden"], "depth": TINY["layers"], "num_heads": TINY["heads"], "img_size": 224}
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **args)
    save_for_hf(model, directory, model_args=args, safe_serialization=True)
    return f"timm:{os.path.abspath(directory)}"
