"""Dense-prediction adapters: pyramid shapes and strides at non-square sizes, weight loading, pretrain init."""
import pytest
import timm
import torch

import vig  # noqa: F401  (registers the ViG models)
from vig.dense.backbones import SimpleFeaturePyramid, create_dense_features, no_weight_decay_names
from vig.dense.config import InitConfig, TrunkConfig
from vig.dense.engine import initial_trunk
from vig.engine import state

PLAIN = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 1}
HIER = {"dims": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)}


def shapes(features):
    return {key: tuple(value.shape) for key, value in features.items()}


@pytest.mark.parametrize("height, width", [(96, 160), (160, 64)])
def test_plain_vig_simple_feature_pyramid_at_non_square_sizes(height, width):
    torch.manual_seed(0)
    features = create_dense_features("vig_tiny", PLAIN)
    assert features.strides == [4, 8, 16, 32]
    # ViTDet: two transposed convs (C/4) at stride 4, one (C/2) at 8, the map itself at 16, max-pooled at 32.
    assert features.out_channels == [8, 16, 32, 32]
    out = features(torch.randn(2, 3, height, width))
    assert list(out) == ["0", "1", "2", "3"]
    assert shapes(out) == {
        str(i): (2, c, height // s, width // s) for i, (c, s) in enumerate(zip(features.out_channels, features.strides))
    }


def test_plain_pyramid_level_16_is_the_trunks_feature_map():
    torch.manual_seed(0)
    features = create_dense_features("vig_tiny", PLAIN).eval()
    x = torch.randn(1, 3, 64, 96)
    (token_map,) = features.trunk.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert torch.equal(features(x)["2"], token_map)


def test_plain_vig_with_patch_4_builds_the_pyramid_by_pooling():
    features = create_dense_features("vig_tiny", {**PLAIN, "img_size": 32, "patch_size": 4})
    out = features(torch.randn(1, 3, 64, 96))
    assert features.out_channels == [32, 32, 32, 32]
    assert shapes(out) == {"0": (1, 32, 16, 24), "1": (1, 32, 8, 12), "2": (1, 32, 4, 6), "3": (1, 32, 2, 3)}


@pytest.mark.parametrize("height, width", [(96, 160), (224, 64)])
def test_hierarchical_vig_returns_normed_stage_outputs_at_non_square_sizes(height, width):
    features = create_dense_features("vig_h_tiny", HIER)
    assert features.strides == [4, 8, 16, 32] and features.out_channels == [16, 32, 64, 128]
    out = features(torch.randn(2, 3, height, width))
    assert shapes(out) == {
        str(i): (2, c, height // s, width // s) for i, (c, s) in enumerate(zip(features.out_channels, features.strides))
    }
    # Each level is LayerNorm-ed over channels (outnorm{i}, weights 1 / bias 0 at init).
    for value in out.values():
        assert torch.allclose(value.mean(1), torch.zeros(()), atol=1e-4)


def test_pyramid_rejects_strides_that_are_not_power_of_two_ratios():
    with pytest.raises(ValueError, match="power-of-two"):
        SimpleFeaturePyramid(32, 16, (4, 12, 16, 32))
    with pytest.raises(ValueError, match="increasing"):
        SimpleFeaturePyramid(32, 16, (8, 4))


def test_classifier_weights_load_into_the_trunk_and_mismatches_are_named():
    classifier = timm.create_model("vig_tiny", num_classes=10, **PLAIN)
    features = create_dense_features("vig_tiny", PLAIN, trunk_state_dict=classifier.state_dict())
    for name, tensor in features.trunk.state_dict().items():
        assert torch.equal(tensor, classifier.state_dict()[name])
    wrong = timm.create_model("vig_tiny", num_classes=10, **{**PLAIN, "embed_dim": 64, "num_heads": 2})
    with pytest.raises(RuntimeError, match="size mismatch"):
        create_dense_features("vig_tiny", PLAIN, trunk_state_dict=wrong.state_dict())
    deeper = timm.create_model("vig_tiny", num_classes=10, **{**PLAIN, "depth": 2})
    with pytest.raises(ValueError, match="does not have"):
        create_dense_features("vig_tiny", PLAIN, trunk_state_dict=deeper.state_dict())
    partial = {k: v for k, v in classifier.state_dict().items() if not k.startswith("blocks.0.mlp")}
    with pytest.raises(ValueError, match="lack"):
        create_dense_features("vig_tiny", PLAIN, trunk_state_dict=partial)


def test_pretrain_weights_file_gives_trunk_config_and_the_better_of_model_and_ema(tmp_path):
    record = {"name": "vig_tiny", "num_classes": 10, "drop_path_rate": 0.0, "kwargs": PLAIN}
    model, ema = state.create_model(record), state.create_model(record)
    path = tmp_path / "best.pt"
    state.save(state.weights(record, model, ema, metrics={"top1": 50.0, "ema_top1": 60.0}), path)
    name, kwargs, weights = initial_trunk(TrunkConfig(drop_path_rate=0.1), InitConfig(kind="pretrain", path=str(path)))
    assert name == "vig_tiny" and kwargs == {**PLAIN, "drop_path_rate": 0.1}
    assert all(torch.equal(weights[k], v) for k, v in ema.state_dict().items())
    _, _, weights = initial_trunk(TrunkConfig(), InitConfig(kind="pretrain", path=str(path), weights="model"))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="pretrain stage"):
        initial_trunk(TrunkConfig(), InitConfig(kind="pretrain", path=str(tmp_path / "missing.pt")))


def test_position_embedding_and_norms_are_exempt_from_weight_decay():
    features = create_dense_features("vig_tiny", PLAIN)
    names = no_weight_decay_names(features)
    assert "trunk.pos_embed" in names and "trunk.norm.weight" in names
    assert "trunk.blocks.0.mlp.gate_proj.weight" not in names


def test_plain_vig_takes_detection_sized_inputs_as_one_long_sequence():
    # 1333x800 padded to 1344x800 by Mask R-CNN: a 50 x 84 = 4,200-token sequence at patch 16.
    features = create_dense_features("vig_tiny", {**PLAIN, "embed_dim": 16}).eval()
    with torch.no_grad():
        out = features(torch.randn(1, 3, 800, 1344))
    assert shapes(out) == {"0": (1, 4, 200, 336), "1": (1, 8, 100, 168), "2": (1, 16, 50, 84), "3": (1, 16, 25, 42)}
    assert all(torch.isfinite(value).all() for value in out.values())
