"""Official checkpoints: parity with the release code's logits, and load_official's contract."""
import argparse
from pathlib import Path

import pytest
import timm
import torch

import vig  # noqa: F401  (registers the models)
from vig.checkpoint import load_official

FIXTURES = torch.load(Path(__file__).parent / "fixtures/official/official_tiny_fixtures.pt", weights_only=True)
# The fixture models' configs (fixtures/official/README.md), on top of the ViG-T / ViG-H-T entry points.
FIXTURE_MODELS = {
    "plain": ("vig_tiny", dict(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10)),
    "hier": (
        "vig_h_tiny",
        dict(dims=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=10, drop_path_rate=0.0),
    ),
}


def fixture_state_dict(kind: str) -> dict[str, torch.Tensor]:
    return dict(FIXTURES[kind]["state_dict"])


@pytest.mark.parametrize("kind", ["plain", "hier"])
def test_official_logits_are_reproduced_in_eval_and_train(kind):
    name, kwargs = FIXTURE_MODELS[kind]
    fixture = FIXTURES[kind]
    model = load_official(fixture["state_dict"], name, **kwargs)
    with torch.no_grad():
        eval_logits = model.eval()(fixture["input"])
        train_logits = model.train()(fixture["input"])
    torch.testing.assert_close(eval_logits, fixture["logits_eval"], atol=2e-3, rtol=0)
    torch.testing.assert_close(train_logits, fixture["logits_train"], atol=2e-3, rtol=0)


# bf16 keeps 8 significant bits (machine epsilon 2**-7); the documented tolerance for a whole model under bf16
# autocast is two epsilons of relative RMS error against the released code's fp32 logits (README, "Models").
BF16_RELATIVE_RMS = 2 * 2**-7


@pytest.mark.parametrize("kind", ["plain", "hier"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bf16_autocast_logits_stay_within_the_documented_tolerance(kind, mode):
    name, kwargs = FIXTURE_MODELS[kind]
    fixture = FIXTURES[kind]
    model = getattr(load_official(fixture["state_dict"], name, **kwargs), mode)()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(fixture["input"]).float()
    expected = fixture[f"logits_{mode}"]
    relative_rms = ((logits - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()
    assert relative_rms <= BF16_RELATIVE_RMS, f"{kind} {mode}: relative RMS error {relative_rms:.2e} in bf16"


@pytest.mark.parametrize("wrap", ["bare", "model", "model_ema"])
def test_release_wrappings_and_files_load(tmp_path, wrap):
    name, kwargs = FIXTURE_MODELS["plain"]
    weights = fixture_state_dict("plain")
    decoy = {k: torch.zeros_like(v) for k, v in weights.items()}
    checkpoint = {
        "bare": weights,
        "model": {"model": weights, "model_ema": decoy, "epoch": torch.tensor(3)},
        "model_ema": {"model": decoy, "model_ema": weights},
    }[wrap]
    path = tmp_path / "release.pth"
    torch.save(checkpoint, path)
    model = load_official(path, name, use_ema=wrap == "model_ema", **kwargs)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], msg=key)


def test_missing_and_unexpected_keys_are_listed():
    name, kwargs = FIXTURE_MODELS["hier"]
    weights = fixture_state_dict("hier")
    del weights["layers.2.blocks.1.op.g_norm.weight"]
    weights["layers.2.blocks.1.op.dirpe"] = torch.zeros(64)
    with pytest.raises(ValueError) as error:
        load_official(weights, name, **kwargs)
    message = str(error.value)
    assert "layers.2.blocks.1.op.g_norm.weight" in message and "layers.2.blocks.1.op.dirpe" in message


def test_shape_mismatch_is_listed():
    name, kwargs = FIXTURE_MODELS["plain"]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv_proj\.weight: checkpoint \(128, 64\)"):
        load_official(fixture_state_dict("plain"), name, **{**kwargs, "embed_dim": 32})


def test_pickled_objects_and_foreign_dicts_are_rejected(tmp_path):
    name, kwargs = FIXTURE_MODELS["plain"]
    path = tmp_path / "ckpt.pth"
    torch.save({"model": fixture_state_dict("plain"), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_official(path, name, **kwargs)
    with pytest.raises(ValueError, match="not a ViG checkpoint"):
        load_official({"weights": fixture_state_dict("plain"), "epoch": 3}, name, **kwargs)


def test_other_resolution_resizes_the_position_embedding_once_at_load():
    name, kwargs = FIXTURE_MODELS["plain"]
    native = load_official(fixture_state_dict("plain"), name, **kwargs).eval()
    resized = load_official(fixture_state_dict("plain"), name, **{**kwargs, "img_size": 96}).eval()
    assert resized.pos_embed.shape == (1, 36, 64)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), native(x))  # load-time resize == run-time resize


def test_new_classifier_keeps_the_trunk():
    name, kwargs = FIXTURE_MODELS["hier"]
    model = load_official(fixture_state_dict("hier"), name, **{**kwargs, "num_classes": 3, "feature_norms": True})
    weights = fixture_state_dict("hier")
    assert model.classifier.head.out_features == 3
    torch.testing.assert_close(model.classifier.norm.weight, weights["classifier.norm.weight"])
    qkv = "layers.3.blocks.0.op.qkv_proj.weight"
    torch.testing.assert_close(model.state_dict()[qkv], weights[qkv])


def test_timm_pretrained_loading_uses_the_release_filter(tmp_path):
    name, kwargs = FIXTURE_MODELS["plain"]
    path = tmp_path / "vig_t_77p2acc.pth"
    torch.save({"model": fixture_state_dict("plain")}, path)
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **{**kwargs, "img_size": 96})
    assert model.pos_embed.shape == (1, 36, 64)
    torch.testing.assert_close(model.head.weight, fixture_state_dict("plain")["head.weight"])
    assert timm.models.get_pretrained_cfg("vig_tiny").hf_hub_filename == "vig_t_77p2acc.pth"
    assert timm.models.get_pretrained_cfg("vig_h_base").url.endswith("/vig_h_b_84p2acc.pth")
