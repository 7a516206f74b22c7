"""StableSR's model core: the SFT layer (both forms), the SFT U-Net, the time-aware encoder and the StableSR module
(zero-init identity, the frozen / trainable split, base-checkpoint loading, sampling from the LR latent)."""
import pytest
import torch

from ldm.checkpoint import save_checkpoint_atomic
from ldm.diffusion import q_sample
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.stablesr import StableSR
from ldm.modules.diffusionmodules import UNetModel
from ldm.modules.stablesr import SFTLayer, SFTUNetModel, TimeAwareEncoder
from ldm.util import ConfigError
from tests.stablesr_layouts import encoder_layout, spade_layout, unet_layout
from tests.test_compat import parameters_on_meta
from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture
from tests.test_unet import SD2_PARAMS, randomize_

# a tiny SD-2.x-like U-Net (linear projections, 32-channel heads, cross-attention) and its encoder
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_head_channels=32, use_spatial_transformer=True,
            use_linear_in_transformer=True, context_dim=16, legacy=False)
ENCODER = dict(in_channels=4, model_channels=32, out_channels=32, num_res_blocks=1, channel_mult=[1, 2],
               attention_resolutions=[1, 2], num_heads=2)


def sft_unet(form="sft", zero_init=True, seed=0):
    torch.manual_seed(seed)
    return SFTUNetModel(**UNET, semb_channels=16, sft_form=form, sft_hidden_channels=8, sft_zero_init=zero_init)


def base_of(model: SFTUNetModel) -> UNetModel:
    """The plain U-Net with the SFT U-Net's base weights (loaded strictly: the keys are the base's)."""
    base = UNetModel(**UNET)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".spade." not in k})
    return base


def inputs(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, torch.randn(batch, 5, 16, generator=g), torch.randn(batch, 4, size, size, generator=g)


# ---- SFT layer -------------------------------------------------------------------------------------------------------
def test_sft_layer_forms_and_zero_init():
    h, feat = torch.randn(2, 32, 4, 4), torch.randn(2, 8, 4, 4)
    sft = SFTLayer(32, 8, 16, form="sft", zero_init=True)
    assert torch.equal(sft(h, feat), h)                                   # exact identity at init
    assert not hasattr(sft, "param_free_norm")
    spade = SFTLayer(32, 8, 16, form="spade", zero_init=True)
    normed = spade.param_free_norm(h)
    assert torch.equal(spade(h, feat), normed) and torch.equal(spade(h, torch.randn_like(feat)), normed)
    torch.testing.assert_close(normed.view(2, 32, -1).mean(-1), torch.zeros(2, 32), atol=1e-5, rtol=0)  # 32 groups
    randomize_(sft), randomize_(spade)
    actv = sft.mlp_shared(feat)
    torch.testing.assert_close(sft(h, feat), h * (1 + sft.mlp_gamma(actv)) + sft.mlp_beta(actv))
    actv, normed = spade.mlp_shared(feat), spade.param_free_norm(h)      # (its bias is random now too)
    torch.testing.assert_close(spade(h, feat), normed * (1 + spade.mlp_gamma(actv)) + spade.mlp_beta(actv))
    default = SFTLayer(32, 8, 16, zero_init=False)                         # the released init: not zero
    assert default.mlp_gamma.weight.abs().sum() > 0 and default.form == "spade"
    with pytest.raises(ValueError, match="form must be one of"):
        SFTLayer(32, 8, form="film")
    with pytest.raises(ValueError, match="LR features \\(2, 8, 2, 2\\) do not match"):
        sft(h, feat[..., :2, :2])


# ---- SFT U-Net ------------------------------------------------------------------------------------------------------
def test_sft_unet_keys_are_the_base_keys_plus_one_spade_per_resblock():
    model = sft_unet()
    base_keys = set(UNetModel(**UNET).state_dict())
    keys = set(model.state_dict())
    spade = {k for k in keys if ".spade." in k}
    assert keys - spade == base_keys
    assert {k.split(".spade.")[0] for k in spade} == set(model.resblock_names) and len(model.resblock_names) == 8
    assert {p.data_ptr() for p in model.sft_parameters()} == {p.data_ptr() for n, p in model.named_parameters()
                                                               if ".spade." in n}


def test_full_size_sft_unet_has_sd2_keys_plus_stablesr_spade_keys():
    """UNetModelDualcondV2 of the released 512 config: the 686 SD 2.x keys (865,910,724 params) and 176 SPADE keys
    (53,020,160 params) of StableSR's manifest, with the published shapes."""
    params = {k: v for k, v in SD2_PARAMS.items() if k != "use_fp16"}
    with parameters_on_meta():
        model = SFTUNetModel(**params, semb_channels=256)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    unet, resblocks = unet_layout()
    assert shapes == unet | spade_layout(resblocks)
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320)                     # linear projection
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["input_blocks.4.0.spade.mlp_shared.0.weight"] == (128, 256, 3, 3)
    assert model.input_blocks[7][1].transformer_blocks[0].attn1.heads == 20           # 1280 / 64


def test_sft_form_zero_init_reproduces_the_base_unet_exactly():
    model = randomize_(sft_unet("sft")).train()
    for name, p in model.named_parameters():            # randomize_ filled the zero SFT convs: zero them again
        if "mlp_gamma" in name or "mlp_beta" in name:
            p.data.zero_()
    base = base_of(model).train()
    x, t, context, _ = inputs()
    feats = {"8": torch.randn(2, 16, 8, 8), "4": torch.randn(2, 16, 4, 4)}
    assert torch.equal(model(x, t, context, struct_cond=feats), base(x, t, context))
    assert torch.equal(model(x, t, context), base(x, t, context))          # no struct_cond: the base U-Net


def test_spade_form_zero_init_ignores_the_lr_features_and_normalises_each_residual_branch():
    model = randomize_(sft_unet("spade")).eval()
    for name, p in model.named_parameters():
        if "mlp_gamma" in name or "mlp_beta" in name:
            p.data.zero_()
    x, t, context, _ = inputs()
    feats = {"8": torch.randn(2, 16, 8, 8), "4": torch.randn(2, 16, 4, 4)}
    other = {k: torch.randn_like(v) for k, v in feats.items()}
    out = model(x, t, context, struct_cond=feats)
    assert torch.equal(out, model(x, t, context, struct_cond=other))
    norms = {n: model.get_submodule(n).spade.param_free_norm for n in model.resblock_names}
    torch.testing.assert_close(out, base_of(model).eval()(x, t, context, modulations=norms), rtol=0, atol=1e-6)
    assert not torch.allclose(out, model(x, t, context), atol=1e-3)       # GroupNorm(F) != F: not the base


def test_sft_unet_features_are_picked_by_width_and_train():
    model = randomize_(sft_unet("spade", zero_init=False)).train()
    x, t, context, _ = inputs()
    feats = {"8": torch.randn(2, 16, 8, 8, requires_grad=True), "4": torch.randn(2, 16, 4, 4, requires_grad=True)}
    model(x, t, context, struct_cond=feats).square().mean().backward()
    assert feats["8"].grad.abs().sum() > 0 and feats["4"].grad.abs().sum() > 0
    with pytest.raises(KeyError, match="works at width 4 but the encoder features have widths \\['8'\\]"):
        model(x, t, context, struct_cond={"8": feats["8"]})


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    """The full-size config checkpoints the frozen U-Net: the SFT closures must still get their gradients."""
    plain = randomize_(sft_unet("spade", zero_init=False)).train()
    torch.manual_seed(0)
    checkpointed = SFTUNetModel(**{**UNET, "use_checkpoint": True}, semb_channels=16, sft_form="spade",
                                sft_hidden_channels=8).train()
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        model.requires_grad_(False)
        for p in model.sft_parameters():
            p.requires_grad_(True)
    x, t, context, _ = inputs()
    grads = []
    for model in (plain, checkpointed):
        feats = {"8": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True),
                 "4": torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)}
        model(x, t, context, struct_cond=feats).square().mean().backward()
        grads.append([feats["8"].grad, feats["4"].grad] + [p.grad for p in model.sft_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---- time-aware encoder ---------------------------------------------------------------------------------------------
def test_encoder_returns_one_map_per_unet_width_and_depends_on_t():
    torch.manual_seed(0)
    enc = randomize_(TimeAwareEncoder(**ENCODER)).eval()
    z = torch.randn(2, 4, 8, 12)
    out = enc(z, torch.tensor([10, 900]))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"12": (2, 32, 8, 12), "6": (2, 32, 4, 6)}
    other = enc(z, torch.tensor([500, 900]))
    assert not torch.allclose(other["12"][0], out["12"][0]) and torch.allclose(other["12"][1], out["12"][1])
    with pytest.raises(ValueError, match="divisible by 2"):
        enc(torch.randn(1, 4, 7, 8), torch.tensor([1]))


def test_full_size_encoder_matches_stablesr_layout():
    """EncoderUNetModelWT of the released configs: 200 tensors, 52,494,080 params, the published key shapes."""
    with parameters_on_meta():
        enc = TimeAwareEncoder(in_channels=4, model_channels=256, out_channels=256, num_res_blocks=2,
                               attention_resolutions=[4, 2, 1], dropout=0, channel_mult=[1, 1, 2, 2], num_heads=4,
                               image_size=96)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == encoder_layout()
    assert shapes["input_blocks.1.1.qkv.weight"] == (768, 256, 1) and shapes["time_embed.0.weight"] == (1024, 256)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 52_494_080
    out = enc.to("meta")(torch.empty(1, 4, 64, 64, device="meta"), torch.tensor([5]).to("meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "64": (1, 256, 64, 64), "32": (1, 256, 32, 32), "16": (1, 256, 16, 16), "8": (1, 256, 8, 8)}
