"""ViG / ViG-H architecture: release configs, timm conventions, init recipe, features for dense heads."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import vig
from vig.layers import GatedLinearAttention, PatchifyConv2d, RMSNorm, space_to_depth_conv
from vig.models import ViG, ViGH

MANIFEST = json.loads((Path(__file__).parent / "fixtures/official/official_state_dict_manifest.json").read_text())
# Drop path rates of the release configs (ViG-T's yaml leaves it at the 0.0 default).
RELEASE_DROP_PATH = {
    "vig_tiny": 0.0, "vig_small": 0.2, "vig_base": 0.5, "vig_h_tiny": 0.2, "vig_h_small": 0.3, "vig_h_base": 0.6,
}
PLAIN_SMALL = dict(embed_dim=64, depth=2, num_heads=2, img_size=64)
HIER_SMALL = dict(dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


def make(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(MANIFEST))
def test_release_architecture_matches_official_state_dict(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == MANIFEST[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == MANIFEST[name]["num_params"]
    drop_path = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert max(drop_path, default=0.0) == pytest.approx(RELEASE_DROP_PATH[name])
    assert model.pretrained_cfg["hf_hub_id"] == "hustvl/ViG"


def test_create_model_overrides_and_activation_flags():
    model = make("vig_small", num_classes=7, drop_path_rate=0.1, **PLAIN_SMALL)
    assert model.head.out_features == 7
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    mixer = model.blocks[0].attn
    assert isinstance(mixer.in_proj[1], nn.Identity) and not mixer.use_out_act
    tiny_mixer = make("vig_tiny", **PLAIN_SMALL).blocks[0].attn
    assert isinstance(tiny_mixer.in_proj[1], nn.SiLU) and tiny_mixer.use_out_act


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", PLAIN_SMALL), ("vig_h_tiny", HIER_SMALL)])
def test_model_compiles_as_one_graph_with_eager_outputs_and_gradients(name, kwargs):
    """torch.compile(fullgraph=True) traces the whole model (aot_eager: no C++ toolchain needed on CPU).

    Static shapes, as the benchmark compiles: after other tests compiled the same code at other sizes, torch
    2.14 would trace dynamic shapes, whose backward graph views a gradient that is not contiguous at run time.
    """
    torch.manual_seed(0)
    model = make(name, num_classes=5, drop_path_rate=0.0, **kwargs)  # training mode, deterministic
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 64, 48)
    first_layer = next(model.parameters())  # its gradient flows back through every block
    expected = model(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), first_layer)
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), first_layer)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", PLAIN_SMALL), ("vig_h_tiny", HIER_SMALL)])
def test_train_and_eval_agree_without_drop_path(name, kwargs):
    model = make(name, num_classes=5, drop_path_rate=0.0, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    assert train_out.shape == (2, 5)
    torch.testing.assert_close(train_out, eval_out)


@pytest.mark.parametrize("size", [(320, 320), (224, 320)])
def test_position_embedding_is_resized_to_the_input(size):
    model = make("vig_tiny", embed_dim=32, depth=1, num_heads=1, num_classes=3).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *size))
        logits = model.forward_head(features)
    assert features.shape == (1, size[0] // 16, size[1] // 16, 32)
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_position_embedding_resize_is_bicubic_fp32():
    model = make("vig_tiny", embed_dim=32, depth=1, num_heads=1, img_size=64)
    grid = model.pos_embed.detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = nn.functional.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    patches = torch.randn(1, 6, 8, 32)
    model.patch_embed = nn.Identity()  # feed a token grid directly to see the added position embedding
    torch.testing.assert_close(model._embed(patches) - patches, expected.permute(0, 2, 3, 1))


def test_forward_features_and_head_conventions():
    model = make("vig_h_tiny", num_classes=4, **HIER_SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
    assert features.shape == (2, 2, 2, 128)
    assert pooled.shape == (2, 128) and logits.shape == (2, 4)
    model.reset_classifier(0)
    assert model.get_classifier().__class__ is nn.Identity
    assert model(x).shape == (2, 128)


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", PLAIN_SMALL), ("vig_h_tiny", HIER_SMALL)])
def test_no_weight_decay_covers_pos_embed_norms_and_biases(name, kwargs):
    model = make(name, **kwargs)
    no_decay = model.no_weight_decay()
    for param_name, param in model.named_parameters():
        exempt = param.ndim <= 1 or param_name == "pos_embed"
        assert (param_name in no_decay) == exempt, param_name
    if name == "vig_tiny":
        assert "pos_embed" in no_decay


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", PLAIN_SMALL), ("vig_h_tiny", HIER_SMALL)])
def test_grad_checkpointing_gives_the_same_gradients(name, kwargs):
    model = make(name, num_classes=3, drop_path_rate=0.0, **kwargs).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], msg=n)


def test_plain_intermediates_are_stride_16_maps():
    model = make("vig_small", **PLAIN_SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, -1], norm=True)
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(1, 64, 4, 6)] * 2
    assert model.feature_info[-1] == dict(num_chs=64, reduction=16, module="blocks.1")
    torch.testing.assert_close(maps[-1], features.permute(0, 3, 1, 2))
    torch.testing.assert_close(final, features)


def test_hier_intermediates_are_stage_outputs_with_output_norms():
    model = make("vig_h_small", feature_norms=True, **HIER_SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
    assert [tuple(m.shape) for m in raw] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    assert [(f["num_chs"], f["reduction"]) for f in model.feature_info] == [(16, 4), (32, 8), (64, 16), (128, 32)]
    expected = model.outnorm1(raw[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(normed[0], expected)
    assert "outnorm3.weight" in model.state_dict()
    with pytest.raises(ValueError, match="feature_norms=True"):
        make("vig_h_small", **HIER_SMALL).forward_intermediates(x, norm=True)


def test_timm_features_only_uses_forward_intermediates():
    backbone = make("vig_h_tiny", features_only=True, **HIER_SMALL)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[1:] for m in maps] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]


def test_plain_init_follows_the_release():
    model = make("vig_base", embed_dim=96, depth=2, num_heads=3)
    mixer = model.blocks[0].attn
    xavier_bound = 2**-2.5 * math.sqrt(6 / (96 + 2 * 48 + 96))
    assert mixer.qkv_proj.weight.abs().max() <= xavier_bound
    assert mixer.qkv_proj.weight.std().item() == pytest.approx(xavier_bound / math.sqrt(3), rel=0.1)
    assert mixer.in_proj[0].weight.abs().max() <= 2**-2.5 * math.sqrt(6 / (9 + 9 * 96))
    assert model.blocks[0].mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert (mixer.g_proj.bias == 0).all() and (mixer.gk_proj[1].bias == 0).all() and (model.head.bias == 0).all()


def test_hier_init_overwrites_mixer_linears_but_keeps_dwconv_xavier():
    model = make("vig_h_base", dims=64, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4))
    mixer = model.layers[3].blocks[0].op  # dim 512: large enough for stable statistics
    assert mixer.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert mixer.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    dwconv_bound = 2**-2.5 * math.sqrt(6 / (9 + 9 * 512))
    assert mixer.in_proj[0].weight.abs().max() <= dwconv_bound
    assert mixer.in_proj[0].weight.std().item() == pytest.approx(dwconv_bound / math.sqrt(3), rel=0.1)
    norm = model.layers[0].blocks[0].norm
    assert (norm.weight == 1).all() and (norm.bias == 0).all()


def test_mixer_matches_the_release_formula():
    """2D gating locality injection spelled out with the release's head layout, on a non-square grid."""
    torch.manual_seed(0)
    mixer = GatedLinearAttention(dim=16, num_heads=2, use_act_in_conv=True, use_out_act=True)
    for p in mixer.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 5, 16)
    conv = nn.functional.conv2d(x.permute(0, 3, 1, 2), mixer.in_proj[0].weight, padding=1, groups=16)
    local = nn.functional.silu(conv)
    local = local.flatten(2).transpose(1, 2)  # [B, L, C]
    q, k, v = mixer.qkv_proj(local).split([8, 8, 16], -1)
    gates = nn.functional.logsigmoid(mixer.gk_proj(local)) / 16
    heads = lambda t: t.unflatten(-1, (2, -1))  # noqa: E731
    from kernels.bigla import naive_recurrent_bigla

    o = naive_recurrent_bigla(heads(q), heads(k), heads(v), heads(gates[..., :8]), heads(gates[..., 8:]))
    rms = lambda t, w: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    g = torch.sigmoid(mixer.g_proj(local)).unflatten(-1, (2, 8))
    mixed = rms(o, mixer.g_norm.weight) * g + rms(heads(local), mixer.l_norm.weight) * (1 - g)
    expected = mixer.o_proj(nn.functional.silu(mixed.flatten(-2))).view(2, 3, 5, 16)
    torch.testing.assert_close(mixer(x), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kernel, stride, size", [(9, 8, (224, 224)), (9, 8, (100, 71)), (5, 4, (33, 40)), (3, 2, (9, 8))]
)
def test_space_to_depth_conv_equals_the_strided_conv(kernel, stride, size):
    """The CUDA form of the stem's conv (pixel_unshuffle + stride-1 conv), checked on CPU against nn.Conv2d."""
    torch.manual_seed(0)
    conv = PatchifyConv2d(3, 8, kernel_size=kernel, stride=stride, padding=1).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = nn.Conv2d.forward(conv, x)
    assert space_to_depth_conv(conv, x).shape == expected.shape
    torch.testing.assert_close(space_to_depth_conv(conv, x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="kernel_size 9 must exceed stride 4 by at most"):
        PatchifyConv2d(3, 8, kernel_size=9, stride=4, padding=1)


def test_rmsnorm_and_bad_head_count():
    norm = RMSNorm(8)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GatedLinearAttention(dim=48, num_heads=5)
    with pytest.raises(ValueError, match="even number"):
        ViG(patch_size=5)
    with pytest.raises(ValueError, match="differ in length"):
        ViGH(dims=16, depths=(1, 1), num_heads=(1, 1, 1))


def test_vig_package_registers_all_models():
    assert {"vig_tiny", "vig_small", "vig_base", "vig_h_tiny", "vig_h_small", "vig_h_base"} <= set(
        timm.list_models("vig_*")
    )
    assert vig.models.ViG is ViG


def test_gflops_counts_linears_convs_and_bigla_analytically():
    from vig.flops import bigla_flops, gflops

    model = make("vig_tiny", embed_dim=32, depth=1, num_heads=1, img_size=32, num_classes=10)
    tokens = 2 * 2  # 32 px: conv 9x9/8 (pad 1) -> 4x4, conv 3x3/2 -> 2x2
    hidden = 256  # int(32 * 8 / 3) = 85, rounded up to a multiple of 256
    stem = 16 * 3 * 81 * 16 + 32 * 16 * 9 * tokens
    mixer = tokens * (32 * 9 + 32 * 64 + 32 * 16 + 16 * 32 + 32 * 32 + 32 * 32) + 2 * tokens * 2 * 16 * 32
    mlp = tokens * (32 * 2 * hidden + hidden * 32)
    assert bigla_flops(tokens, heads=1, key_dim=16, value_dim=32) == 2 * tokens * 2 * 16 * 32
    assert gflops(model, img_size=32) * 1e9 == pytest.approx(stem + mixer + mlp + 32 * 10)
    assert model.training  # restored


def test_flops_cli_prints_params_and_gflops(capsys):
    from vig.flops import main

    main(["--models", "vig_tiny", "--img-size", "32"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "vig_tiny" and row[1] == "5,834,536" and float(row[2]) > 0
