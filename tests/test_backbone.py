"""Backbones load from spec strings through the real transformers/timm loading code."""

from __future__ import annotations

import pytest
import torch

from cache import Stage1Error
from extract.backbone import BackboneSpec, load_backbone


@pytest.mark.parametrize("which", ["tiny_hf", "tiny_timm"])
def test_features_match_direct_model_call(which, request):
    spec = request.getfixturevalue(which)
    bb = load_backbone(spec)
    assert bb.num_prefix_tokens == 5 and bb.embed_dim == 64 and bb.patch_size == 16
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = bb(x)
        if bb.library == "hf":
            tok = bb.model(pixel_values=x).last_hidden_state
            torch.testing.assert_close(feats["cls"], bb.model(pixel_values=x).pooler_output)
        else:
            tok = bb.model.forward_features(x)
    assert tok.shape == (3, 1 + 4 + 196, 64)
    torch.testing.assert_close(feats["cls"], tok[:, 0])
    torch.testing.assert_close(feats["patch_mean"], tok[:, 5:].mean(1))  # registers excluded
    assert torch.isfinite(feats["cls"]).all() and not feats["cls"].requires_grad


def test_weights_hash_identifies_weights(tiny_hf, tmp_path):
    from extract.tiny import save_tiny_hf

    a = load_backbone(tiny_hf)
    assert a.weights_sha256 == load_backbone(tiny_hf).weights_sha256
    other = save_tiny_hf(str(tmp_path / "other"), seed=1)
    assert load_backbone(other).weights_sha256 != a.weights_sha256
    assert "spec" not in a.describe()  # the location is provenance, not identity


def test_timm_name_with_local_weights_file(tiny_timm, tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = load_backbone("timm:vit_small_patch16_dinov3", weights=str(path))
    assert bb.embed_dim == 384
    for k, v in ref.state_dict().items():
        assert torch.equal(bb.model.state_dict()[k], v)


@pytest.mark.parametrize("spec,match", [
    ("dinov3-large", "unknown backbone spec 'dinov3-large'"),
    ("onnx:model", "unknown backbone spec"),
    ("timm:resnet_9000", "unknown timm model 'resnet_9000'; DINOv3 models in timm"),
    ("hf:/no/such/dir", "cannot load a transformers config"),
])
def test_unknown_backbones(spec, match):
    with pytest.raises(Stage1Error, match=match):
        load_backbone(spec)


def test_non_dinov3_hf_model_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
              ).save_pretrained(tmp_path)
    with pytest.raises(Stage1Error, match="model type 'bert' is not supported"):
        load_backbone(f"hf:{tmp_path}")


def test_weights_only_for_timm(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(Stage1Error, match="--weights .* is for timm"):
        BackboneSpec.parse("hf:x", weights=str(f))
    with pytest.raises(Stage1Error, match="backbone weights file not found"):
        BackboneSpec.parse("timm:vit_small_patch16_dinov3", weights=str(tmp_path / "none"))
