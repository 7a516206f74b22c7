import math

import pytest
import torch
import torch.utils.checkpoint

from ldm.modules.diffusionmodules import (AttentionBlock, CrossAttention, ResBlock, UNetModel, apply_modulation,
                                          timestep_embedding)
from ldm.modules.diffusionmodules.attention import qkv_attention
from ldm.util import ConfigError, instantiate_from_config

UNET_TARGET = "ldm.modules.diffusionmodules.unet.UNetModel"

# unet_config.params of SD 1.x v1-inference.yaml
SD1_PARAMS = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
# unet_config.params of SD 2.x v2-inference-v.yaml
SD2_PARAMS = dict(use_checkpoint=True, use_fp16=True, image_size=32, in_channels=4, out_channels=4,
                  model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                  num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                  transformer_depth=1, context_dim=1024, legacy=False)
# a tiny text-conditional U-Net: two levels, attention on the second level and in the middle
TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16,
            legacy=False)


def expected_unet_keys(model_channels, channel_mult, num_res_blocks, attention_resolutions):
    """Every state_dict key of a CompVis cross-attention U-Net (depth-1 transformers), from the layout rules."""
    keys = []

    def weight_bias(prefix):
        keys.extend([f"{prefix}.weight", f"{prefix}.bias"])

    def resblock(prefix, c_in, c_out):
        for name in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"):
            weight_bias(f"{prefix}.{name}")
        if c_in != c_out:
            weight_bias(f"{prefix}.skip_connection")

    def transformer(prefix):
        for name in ("norm", "proj_in", "proj_out"):
            weight_bias(f"{prefix}.{name}")
        block = f"{prefix}.transformer_blocks.0"
        for attn in ("attn1", "attn2"):
            keys.extend(f"{block}.{attn}.to_{p}.weight" for p in "qkv")
            weight_bias(f"{block}.{attn}.to_out.0")
        for name in ("ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"):
            weight_bias(f"{block}.{name}")

    weight_bias("time_embed.0"), weight_bias("time_embed.2"), weight_bias("input_blocks.0.0")
    skips, ch, ds, n = [model_channels], model_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{n}.0", ch, mult * model_channels)
            ch = mult * model_channels
            if ds in attention_resolutions:
                transformer(f"input_blocks.{n}.1")
            skips.append(ch)
            n += 1
        if level < len(channel_mult) - 1:
            weight_bias(f"input_blocks.{n}.0.op")
            skips.append(ch)
            n, ds = n + 1, ds * 2
    resblock("middle_block.0", ch, ch), transformer("middle_block.1"), resblock("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(num_res_blocks + 1):
            c_in, ch = ch + skips.pop(), channel_mult[level] * model_channels
            resblock(f"output_blocks.{n}.0", c_in, ch)
            attention = ds in attention_resolutions
            if attention:
                transformer(f"output_blocks.{n}.1")
            if level > 0 and i == num_res_blocks:
                weight_bias(f"output_blocks.{n}.{2 if attention else 1}.conv")
                ds //= 2
            n += 1
    weight_bias("out.0"), weight_bias("out.2")
    return keys


def randomize_(model, seed=0):
    """Give the zero-initialised layers random weights so that every path carries signal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return UNetModel(**{**TINY, **overrides})


def inputs(batch=2, channels=4, size=8, context_len=5, context_dim=16):
    torch.manual_seed(1)
    return (torch.randn(batch, channels, size, size), torch.tensor([3, 997][:batch]),
            torch.randn(batch, context_len, context_dim))


# ------------------------------------------------------------------------------------------ SD key layout
def test_sd1_unet_has_the_published_key_layout():
    with torch.device("meta"):
        model = instantiate_from_config({"target": UNET_TARGET, "params": SD1_PARAMS})
    sd = model.state_dict()
    assert len(sd) == 686
    assert set(sd) == set(expected_unet_keys(320, [1, 2, 4, 4], 2, [4, 2, 1]))
    shapes = {"input_blocks.0.0.weight": (320, 4, 3, 3), "time_embed.0.weight": (1280, 320),
              "time_embed.2.weight": (1280, 1280),
              "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": (320, 320),
              "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
              "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
              "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
              "input_blocks.3.0.op.weight": (320, 320, 3, 3),
              "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
              "input_blocks.4.0.emb_layers.1.weight": (640, 1280),
              "middle_block.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
              "output_blocks.0.0.in_layers.0.weight": (2560,),
              "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
              "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
              "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
              "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
              "out.0.weight": (320,), "out.2.weight": (4, 320, 3, 3)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert sum(v.numel() for v in sd.values()) == 859_520_964


def test_sd2_config_builds_with_linear_projections():
    with pytest.warns(UserWarning, match="use_fp16"), torch.device("meta"):
        model = instantiate_from_config({"target": UNET_TARGET, "params": SD2_PARAMS})
    sd = model.state_dict()
    assert len(sd) == 686
    assert sd["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert sd["output_blocks.11.1.proj_out.weight"].shape == (320, 320)
    assert sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 1024)
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 1280 // 64
    assert sum(v.numel() for v in sd.values()) == 865_910_724


# unet_config.params of other published CompVis / SD 2.x YAMLs
PUBLISHED_PARAMS = {
    "ldm-celebahq256": dict(image_size=64, in_channels=3, out_channels=3, model_channels=224,
                            attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                            num_head_channels=32),
    "ldm-cin256-v2": dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                          attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1,
                          use_spatial_transformer=True, transformer_depth=1, context_dim=512),
    "ldm-txt2img-1p4B": dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                             attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8,
                             use_spatial_transformer=True, transformer_depth=1, context_dim=1280, use_checkpoint=True,
                             legacy=False),
    "sd2-x4-upscaler": dict(num_classes=1000, use_checkpoint=True, image_size=128, in_channels=7, out_channels=4,
                            model_channels=256, attention_resolutions=[2, 4, 8], num_res_blocks=2,
                            channel_mult=[1, 2, 2, 4], disable_self_attentions=[True, True, True, False],
                            disable_middle_self_attn=False, num_heads=8, use_spatial_transformer=True,
                            transformer_depth=1, context_dim=1024, legacy=False, use_linear_in_transformer=True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_unet_configs_build_unchanged(name):
    params = PUBLISHED_PARAMS[name]
    with torch.device("meta"):
        model = instantiate_from_config({"target": UNET_TARGET, "params": params})
    sd = model.state_dict()
    assert sd["input_blocks.0.0.weight"].shape == (params["model_channels"], params["in_channels"], 3, 3)
    assert sd["out.2.weight"].shape == (params["out_channels"], params["model_channels"], 3, 3)


# ------------------------------------------------------------------------------------ timestep embedding
def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0, 3]), 6)
    assert emb.shape == (2, 6)
    assert torch.equal(emb[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_timestep_embedding_odd_dim_and_float_timesteps():
    emb = timestep_embedding(torch.tensor([5.0, 7.5]), 7)
    assert emb.shape == (2, 7) and torch.equal(emb[:, -1], torch.zeros(2))
    torch.testing.assert_close(timestep_embedding(torch.tensor([5]), 8), timestep_embedding(torch.tensor([5.0]), 8))
    with pytest.raises(ValueError, match=r"timesteps must have shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


# ------------------------------------------------------------------------------------------ tiny U-Nets
def test_fresh_unet_outputs_zeros_from_its_zero_initialised_output_conv():
    x, t, context = inputs()
    out = tiny()(x, t, context)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))


def test_cross_attention_unet_forward_and_gradients_reach_every_parameter():
    model = randomize_(tiny())
    x, t, context = inputs()
    context.requires_grad_(True)
    out = model(x, t, context)
    assert out.shape == x.shape and out.abs().sum() > 0
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []
    assert context.grad.abs().sum() > 0
    other = model(x, t, torch.randn_like(context))
    assert not torch.allclose(out, other)


def test_norm_num_groups_sets_every_group_norm_and_must_divide_the_channels():
    groups = {m.num_groups for m in UNetModel(**{**TINY, "norm_num_groups": 8}).modules()
              if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    assert {m.num_groups for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm)} == {32}  # CompVis
    with pytest.raises(ValueError, match="not divisible by 12 groups"):
        UNetModel(**{**TINY, "norm_num_groups": 12})


def test_context_list_is_joined_along_tokens_and_scalar_timesteps_broadcast():
    model = randomize_(tiny()).eval()
    x, _, context = inputs()
    with torch.no_grad():
        joined = model(x, torch.tensor([10, 10]), context)
        split = model(x, torch.tensor([10, 10]), [context[:, :2], context[:, 2:]])
        scalar = model(x, 10, context)
        as_float = model(x, torch.tensor([10.0, 10.0]), context)
    torch.testing.assert_close(split, joined)
    torch.testing.assert_close(scalar, joined)
    torch.testing.assert_close(as_float, joined)


def test_spatial_transformer_without_context_dim_self_attends():
    model = randomize_(tiny(context_dim=None))
    assert model.middle_block[1].transformer_blocks[0].attn2.to_k.in_features == 64
    x, t, _ = inputs()
    assert model(x, t).shape == x.shape


def test_class_conditional_unet_requires_y_and_uses_it():
    model = randomize_(tiny(use_spatial_transformer=False, context_dim=None, num_classes=10))
    assert model.label_emb.weight.shape == (10, 128)
    x, t, _ = inputs()
    with torch.no_grad():
        a, b = model(x, t, y=torch.tensor([1, 2])), model(x, t, y=torch.tensor([3, 4]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pass y if and only if.*missing"):
        model(x, t)
    with pytest.raises(ValueError, match="pass y if and only if.*given"):
        tiny()(x, t, inputs()[2], y=torch.tensor([1, 2]))


def test_sd2_options_linear_projection_disabled_self_attention_and_adm_labels():
    model = tiny(use_linear_in_transformer=True, num_heads=-1, num_head_channels=16,
                 disable_self_attentions=[False, True], num_classes="sequential", adm_in_channels=8)
    sd = model.state_dict()
    assert sd["input_blocks.3.1.proj_in.weight"].shape == (64, 64)
    assert sd["input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 16)   # attends to context
    assert sd["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (64, 64)
    assert sd["label_emb.0.0.weight"].shape == (128, 8) and sd["label_emb.0.2.weight"].shape == (128, 128)
    x, t, context = inputs()
    assert randomize_(model)(x, t, context, y=torch.randn(2, 8)).shape == x.shape


def test_num_attention_blocks_limits_attention_per_level():
    model = tiny(num_res_blocks=2, num_attention_blocks=[0, 1])
    keys = model.state_dict().keys()
    assert any(k.startswith("input_blocks.4.1.") for k in keys)          # first ResBlock of level 1
    assert not any(k.startswith("input_blocks.5.1.") for k in keys)      # second: no attention
    assert not any(k.startswith("output_blocks.1.1.") for k in keys)


def test_ldm_unconditional_config_with_plain_attention_builds_and_runs():
    model = tiny(use_spatial_transformer=False, context_dim=None, num_heads=-1, num_head_channels=32,
                 attention_resolutions=[1, 2])
    sd = model.state_dict()
    assert sd["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    assert sd["middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    assert isinstance(model.middle_block[1], AttentionBlock) and model.middle_block[1].num_heads == 2
    randomize_(model)
    x, t, _ = inputs()
    out = model(x, t)
    assert out.shape == x.shape
    new_order = tiny(use_spatial_transformer=False, context_dim=None, num_heads=-1, num_head_channels=32,
                     attention_resolutions=[1, 2], use_new_attention_order=True)
    new_order.load_state_dict(model.state_dict())
    assert not torch.allclose(new_order(x, t), out)                         # same weights, other head split


def test_resblock_updown_and_scale_shift_norm():
    model = randomize_(tiny(resblock_updown=True, use_scale_shift_norm=True, out_channels=8))
    sd = model.state_dict()
    assert "input_blocks.2.0.in_layers.2.weight" in sd and not any(".op." in k for k in sd)
    assert "output_blocks.1.2.in_layers.2.weight" in sd                    # up ResBlock after the transformer
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)   # scale and shift
    x, t, context = inputs()
    assert model(x, t, context).shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------- attention head orders
def reference_qkv_attention(qkv, heads, new_order):
    """Per-head softmax(q k^T / sqrt(d)) v with the channel index spelled out."""
    d = qkv.shape[1] // (3 * heads)
    outs = []
    for h in range(heads):
        if new_order:
            q, k, v = (qkv[:, j * heads * d + h * d: j * heads * d + (h + 1) * d] for j in range(3))
        else:
            q, k, v = (qkv[:, h * 3 * d + j * d: h * 3 * d + (j + 1) * d] for j in range(3))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", weight, v))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("new_order", [False, True])
def test_qkv_attention_head_orders(new_order):
    qkv = torch.randn(2, 3 * 4 * 8, 10)
    torch.testing.assert_close(qkv_attention(qkv, 4, new_order), reference_qkv_attention(qkv, 4, new_order))
    assert not torch.allclose(qkv_attention(qkv, 4, new_order), qkv_attention(qkv, 4, not new_order))


def test_cross_attention_matches_per_head_reference():
    attn = CrossAttention(query_dim=12, context_dim=6, heads=3, dim_head=4)
    x, context = torch.randn(2, 5, 12), torch.randn(2, 7, 6)
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    heads = []
    for h in range(3):
        s = slice(4 * h, 4 * h + 4)
        weight = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weight @ v[..., s])
    torch.testing.assert_close(attn(x, context), attn.to_out(torch.cat(heads, dim=-1)))
    with pytest.raises(ValueError, match="context has 5 features per token, expected context_dim=6"):
        attn(x, torch.randn(2, 7, 5))


# ------------------------------------------------------------------------------------ gradient checkpointing
def test_use_checkpoint_gives_same_output_and_gradients(monkeypatch):
    plain = randomize_(tiny())
    checkpointed = tiny(use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, t, context = inputs()
    outs = []
    for model in (plain, checkpointed):
        out = model.train()(x, t, context)
        out.square().mean().backward()
        outs.append(out)
    assert len(calls) == 8 + 4                                 # 8 ResBlocks, 4 transformer blocks
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    calls.clear()
    checkpointed.eval()(x, t, context)
    with torch.no_grad():
        checkpointed.train()(x, t, context)
    assert calls == []                                           # only when training with grad enabled


# ----------------------------------------------------------------------------------------- SFT modulation
def test_resblock_modulation_acts_on_the_residual_branch_output_before_the_skip_add():
    torch.manual_seed(0)
    block = randomize_(ResBlock(32, 16, out_channels=64)).eval()
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    alpha, beta = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
    h = block.out_layers(block.in_layers(x) + block.emb_layers(emb)[:, :, None, None])
    expected = block.skip_connection(x) + (1 + alpha) * h + beta
    torch.testing.assert_close(block(x, emb, (alpha, beta)), expected)
    torch.testing.assert_close(block(x, emb, lambda feats: (alpha, beta)), expected)
    torch.testing.assert_close(block(x, emb, lambda feats: feats.tanh()), block.skip_connection(x) + h.tanh())
    with pytest.raises(TypeError, match="modulation must be an \\(alpha, beta\\) pair"):
        apply_modulation(h, lambda feats: (alpha, beta, beta))
    with pytest.raises(ValueError, match="modulation returned features of shape \\(2, 64, 2, 2\\)"):
        apply_modulation(h, lambda feats: feats[..., :2, :2])


def test_unet_modulations_zero_is_identity_nonzero_changes_and_trains():
    model = randomize_(tiny(use_checkpoint=True)).train()
    x, t, context = inputs()
    names = model.resblock_names
    assert names[0] == "input_blocks.1.0" and "middle_block.2" in names and len(names) == 2 + 2 + 4
    base = model(x, t, context)
    zero = {n: (lambda h: (torch.zeros_like(h), torch.zeros_like(h))) for n in names}
    torch.testing.assert_close(model(x, t, context, modulations=zero), base, rtol=0, atol=0)
    alpha = torch.zeros(1, 64, 1, 1, requires_grad=True)
    beta = torch.full((1, 64, 1, 1), 0.5, requires_grad=True)
    out = model(x, t, context, modulations={"middle_block.0": (alpha, beta)})
    assert not torch.allclose(out, base)
    out.square().mean().backward()
    assert alpha.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="modulations name no ResBlock: \\['middle_block.1'\\]"):
        model(x, t, context, modulations={"middle_block.1": (alpha, beta)})


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides, message", [
    (dict(dims=3), "dims=3 is not supported"),
    (dict(n_embed=16), "n_embed"),
    (dict(num_head_channels=16), "exactly one of num_heads"),
    (dict(num_heads=-1), "exactly one of num_heads"),
    (dict(use_spatial_transformer=False), "context_dim is set but use_spatial_transformer is False"),
    (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks=\\[1, 1, 1\\] must have one entry per level"),
    (dict(num_classes="continuous"), "num_classes='continuous' is not supported"),
    (dict(num_classes="sequential"), "needs adm_in_channels"),
    (dict(transformer_depth=0), "transformer_depth"),
])
def test_unsupported_config_values_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        UNetModel(**{**TINY, **overrides})


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="num_head_channel .*did you mean 'num_head_channels'"):
        instantiate_from_config({"target": UNET_TARGET, "params": {**TINY, "num_head_channel": 32}})


def test_bad_forward_inputs_raise_clear_errors():
    model = tiny()
    x, t, context = inputs()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 7, 8), t, context)
    with pytest.raises(ValueError, match="x must be \\(B, 4, H, W\\)"):
        model(torch.randn(2, 3, 8, 8), t, context)
    with pytest.raises(ValueError, match="timesteps must be \\(B,\\)"):
        model(x, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match="pass context"):
        model(x, t)
    plain = tiny(use_spatial_transformer=False, context_dim=None)
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context)
