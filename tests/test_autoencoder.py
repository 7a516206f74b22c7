"""First stage: Gaussian posterior, Encoder/Decoder layout, Lightning KL/VQ autoencoders, configs."""
import copy
import functools
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.plugins.precision import MixedPrecision
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import ldm.losses.autoencoder_loss as autoencoder_loss
from ldm.data.photos import Photos
from ldm.data.shapes import Shapes
from ldm.models.autoencoder import AutoencoderKL, VQModel, VQModelInterface
from ldm.modules.autoencoder import AttnBlock, Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, instantiate_from_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "autoencoder"


# ---- DiagonalGaussianDistribution ----------------------------------------------------------------------------
def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 5)
    post = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    closed = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    assert torch.allclose(post.kl(), closed, atol=1e-5)
    assert torch.allclose(post.kl(), reference, atol=1e-4)
    other = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 5))
    p = torch.distributions.Normal(other.mean, other.std)
    assert torch.allclose(post.kl(other), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)), atol=1e-4)
    assert torch.allclose(post.nll(mean), -q.log_prob(mean).sum(dim=(1, 2, 3)), atol=1e-4)


def test_sample_statistics_mode_and_determinism():
    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    s = post.sample(generator=torch.Generator().manual_seed(0))
    assert torch.allclose(s.mean(0).flatten(), torch.tensor([1.0, -2.0]), atol=0.05)
    assert torch.allclose(s.std(0).flatten(), torch.tensor([0.5, 2.0]), atol=0.05)
    s2 = post.sample(generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2) and torch.equal(post.mode(), mean)
    point = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)[:3], deterministic=True)
    assert torch.equal(point.sample(), point.mean) and torch.equal(point.kl(), torch.zeros(3))


def test_logvar_is_clamped_and_odd_channels_rejected():
    post = DiagonalGaussianDistribution(torch.tensor([0.0, 0.0, -100.0, 100.0]).view(1, 4, 1, 1))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    with pytest.raises(ValueError, match="even number of channels"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


# ---- Encoder / Decoder -----------------------------------------------------------------------------------------
def ddconfig(**kw) -> dict:
    cfg = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return cfg | kw


@pytest.mark.parametrize("ch_mult,f", [([1, 1, 2], 4), ([1, 1, 1, 2], 8), ([1, 1, 1, 1, 2], 16)])
def test_encoder_decoder_shapes(ch_mult, f):
    cfg = ddconfig(ch_mult=ch_mult, resolution=32, attn_resolutions=[32 // f])
    enc, dec = Encoder(**cfg), Decoder(**cfg)
    x = torch.randn(1, 3, 32, 48)
    moments, feats = enc(x, return_features=True)
    assert moments.shape == (1, 8, 32 // f, 48 // f)
    assert torch.equal(moments, enc(x))
    assert [t.shape for t in feats] == [(1, 32 * m, 32 >> i, 48 >> i) for i, m in enumerate(ch_mult)]
    assert dec(moments[:, :4]).shape == (1, 3, 32, 48)
    assert dec.z_shape == (1, 4, 32 // f, 32 // f)
    assert Encoder(**(cfg | {"double_z": False}))(x).shape == (1, 4, 32 // f, 48 // f)


def _keys(prefix: str, names: list[str]) -> set[str]:
    return {f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")}


def test_state_dict_follows_compvis_layout():
    cfg = ddconfig(ch_mult=[1, 2], resolution=16, attn_resolutions=[8])
    res = ["norm1", "conv1", "norm2", "conv2"]
    attn = ["norm", "q", "k", "v", "proj_out"]
    expected_enc = (_keys("", ["conv_in", "norm_out", "conv_out"]) | _keys("down.0.block.0", res)
                    | _keys("down.0.downsample", ["conv"]) | _keys("down.1.block.0", res + ["nin_shortcut"])
                    | _keys("down.1.attn.0", attn) | _keys("mid.block_1", res) | _keys("mid.attn_1", attn)
                    | _keys("mid.block_2", res))
    expected_dec = (_keys("", ["conv_in", "norm_out", "conv_out"]) | _keys("mid.block_1", res)
                    | _keys("mid.attn_1", attn) | _keys("mid.block_2", res) | _keys("up.1.block.0", res)
                    | _keys("up.1.block.1", res) | _keys("up.1.attn.0", attn) | _keys("up.1.attn.1", attn)
                    | _keys("up.1.upsample", ["conv"]) | _keys("up.0.block.0", res + ["nin_shortcut"])
                    | _keys("up.0.block.1", res))
    strip = lambda keys: {k.lstrip(".") for k in keys}  # noqa: E731
    assert set(Encoder(**cfg).state_dict()) == strip(expected_enc)
    assert set(Decoder(**cfg).state_dict()) == strip(expected_dec)


def test_sd_vae_layout_has_248_keys_and_83_6m_parameters():
    cfg = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        model = AutoencoderKL(cfg, {"target": "torch.nn.Identity"}, embed_dim=4)
    sd = model.state_dict()
    assert len(sd) == 248 and sum(v.numel() for v in sd.values()) == 83_653_863
    assert {"quant_conv.weight", "post_quant_conv.bias", "encoder.down.3.block.1.conv2.weight",
            "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.norm2.bias"} <= set(sd)
    assert not any(k.startswith(("encoder.down.3.downsample", "decoder.up.0.upsample")) for k in sd)


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))   # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)    # (B, HW, HW)
    out = (v @ w.transpose(1, 2)).view(2, 32, 3, 5)
    assert torch.allclose(block(x), x + block.proj_out(out), atol=1e-5)


def test_bad_ddconfig_errors_name_the_key():
    with pytest.raises(ConfigError, match="ch_multt"):
        Encoder(**ddconfig(ch_multt=[1, 2]))
    with pytest.raises(ConfigError, match="attn_type"):
        Decoder(**ddconfig(attn_type="linear"))
    with pytest.raises(ValueError, match="divisible by 32"):
        Encoder(**ddconfig(ch=16))
    with pytest.raises(ConfigError, match="norm_type='batch'"):
        Decoder(**ddconfig(norm_type="batch"))


def test_norm_type_none_drops_every_norm_and_keeps_the_rest_of_the_layout():
    cfg = ddconfig(ch_mult=[1, 2], resolution=16, attn_resolutions=[8])
    for net in (Encoder, Decoder):
        plain, grouped = net(**cfg, norm_type="none"), net(**cfg)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
        norm_keys = {k for k in grouped.state_dict() if "norm" in k.rsplit(".", 2)[-2]}
        assert norm_keys and set(plain.state_dict()) == set(grouped.state_dict()) - norm_keys
    assert Decoder(**cfg, norm_type="none")(torch.randn(2, 4, 8, 8)).shape == (2, 3, 16, 16)


# ---- Lightning modules -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fast_lpips(monkeypatch):
    """Build the (random-trunk) LPIPS network once per session; each loss gets a deep copy."""
    monkeypatch.setattr(autoencoder_loss, "build_lpips", _cached_lpips)


@functools.cache
def _lpips_prototype(pretrained_backbone: bool):
    from ldm.losses.lpips import build_lpips
    with torch.device("cpu"):                     # also when first asked for inside a meta-device test
        return build_lpips(pretrained_backbone=False)


def _cached_lpips(pretrained_backbone: bool = True, net: str = "vgg"):
    return copy.deepcopy(_lpips_prototype(pretrained_backbone))


def kl_loss(disc_start: int = 0, perceptual_weight: float = 0.0) -> dict:
    return {"target": "ldm.losses.autoencoder_loss.LPIPSWithDiscriminator",
            "params": {"disc_start": disc_start, "kl_weight": 1e-6, "disc_weight": 0.5, "disc_ndf": 8,
                       "perceptual_weight": perceptual_weight, "lpips_pretrained_backbone": False}}


def vq_loss(disc_start: int = 0, perceptual_weight: float = 1.0) -> dict:
    return {"target": "ldm.losses.autoencoder_loss.VQLPIPSWithDiscriminator",
            "params": {"disc_start": disc_start, "codebook_weight": 1.0, "disc_weight": 0.75, "disc_ndf": 8,
                       "perceptual_weight": perceptual_weight, "lpips_pretrained_backbone": False}}


def photo_loader(split: str = "train", n: int = 8) -> DataLoader:
    return DataLoader(Photos(split, size=32, length=n), batch_size=2)


def trainer(max_steps: int = 4, **kw) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


class ClipRecordingKL(AutoencoderKL):
    """Records the gradient norm each optimizer sees after the module's clipping hook."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.seen.append((optimizer is self.optimizers()[1].optimizer,
                          torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))


class DiscriminatorWatch(pl.Callback):
    """Whether the discriminator's parameters changed during each training batch."""

    def __init__(self):
        self.changed = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = [p.detach().clone() for p in module.loss.discriminator.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = list(module.loss.discriminator.parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self.before, after)))


@pytest.mark.slow
def test_kl_training_counts_batches_and_steps_discriminator_after_disc_start():
    torch.manual_seed(0)
    model = ClipRecordingKL(ddconfig(), kl_loss(disc_start=2), embed_dim=4, grad_clip=0.05, lr_warmup_steps=8,
                            use_ema=True, ema_decay=0.9)
    model.seen, model.learning_rate = [], 1e-3
    watch = DiscriminatorWatch()
    tr = trainer(max_steps=4, callbacks=[watch])
    tr.fit(model, photo_loader())
    assert tr.global_step == 4                                       # one step per batch, D active on 2 of them
    assert watch.changed == [False, False, True, True]
    assert model.loss.logvar.item() != 0.0                            # logvar is in the generator optimizer
    assert all(math.isfinite(float(v)) for k, v in tr.callback_metrics.items() if k.startswith("train/"))
    assert tr.callback_metrics["train/disc_loss"] > 0
    assert [is_d for is_d, _ in model.seen] == [False, False, False, True, False, True]
    assert all(norm <= 0.05 * (1 + 1e-4) for _, norm in model.seen)   # both optimizers clipped
    opt_g, opt_d = tr.optimizers
    assert opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 8)  # warm-up at step 3
    assert int(model.model_ema.num_updates) == 4
    ema_w = model.model_ema.encoderconv_inweight
    assert not torch.equal(ema_w, model.encoder.conv_in.weight)
    with model.ema_scope():
        assert torch.equal(model.encoder.conv_in.weight, ema_w)
    assert not torch.equal(model.encoder.conv_in.weight, ema_w)


class ScalerStageKL(AutoencoderKL):
    """Records the GradScaler stage of each optimizer when the clipping hook runs."""

    def on_before_optimizer_step(self, optimizer):
        self.stages.append(self.trainer.precision_plugin.scaler._per_optimizer_states[id(optimizer)]["stage"].name)
        super().on_before_optimizer_step(optimizer)


@pytest.mark.slow
def test_fp16_grad_scaler_path_counts_batches_and_clips_unscaled_gradients():
    model = ScalerStageKL(ddconfig(), kl_loss(disc_start=1), embed_dim=4, grad_clip=1.0)
    model.stages, model.learning_rate = [], 1e-4
    watch = DiscriminatorWatch()
    tr = trainer(max_steps=3, callbacks=[watch], plugins=[MixedPrecision("16-mixed", device="cpu")])
    tr.fit(model, photo_loader())
    assert tr.global_step == 3 and watch.changed == [False, True, True]
    assert model.stages == ["UNSCALED"] * 5                           # 3 generator + 2 discriminator steps


@pytest.mark.slow
def test_vq_training_logs_codebook_statistics_and_validation_metrics():
    torch.manual_seed(0)
    model = VQModel(ddconfig(double_z=False), vq_loss(disc_start=1), n_embed=16, embed_dim=4,
                    monitor="val/rec_loss")
    model.learning_rate = 1e-3
    before = model.quantize.embedding.weight.detach().clone()
    tr = trainer(max_steps=3)
    tr.fit(model, photo_loader())
    assert tr.global_step == 3
    m = dict(tr.callback_metrics)
    assert 1.0 <= m["train/perplexity"] <= 16.0 and 0.0 < m["train/codebook_usage"] <= 1.0
    tr.validate(model, photo_loader("validation", 4), verbose=False)
    m = tr.callback_metrics
    for key in ("val/psnr", "val/ssim", "val/lpips", "val/rec_loss", "val/perplexity", "val/disc_loss"):
        assert key in m and math.isfinite(float(m[key])), key
    assert 0.0 < m["val/psnr"] < 60.0 and -1.0 <= m["val/ssim"] <= 1.0
    assert not torch.equal(model.quantize.embedding.weight, before)
    assert model.monitor == "val/rec_loss"


@pytest.mark.slow
def test_kl_training_on_shapes_with_ema_validation():
    model = AutoencoderKL(ddconfig(), kl_loss(disc_start=100), embed_dim=4, use_ema=True)
    model.learning_rate = 1e-3
    tr = trainer(max_steps=2)
    tr.fit(model, DataLoader(Shapes("train", size=32, length=4), batch_size=2))
    assert tr.global_step == 2
    weights = model.encoder.conv_in.weight.detach().clone()
    with model.ema_scope():
        psnr_ema = model.quality_metrics(*_pair(model))["psnr"]
    assert torch.equal(model.encoder.conv_in.weight, weights)
    tr.validate(model, DataLoader(Shapes("validation", size=32, length=2), batch_size=2), verbose=False)
    assert tr.callback_metrics["val/psnr"].item() == pytest.approx(psnr_ema.item(), rel=1e-4)  # EMA weights


def _pair(model):
    x = Shapes("validation", size=32, length=2)
    x = torch.stack([x[0]["image"], x[1]["image"]])
    return x, model(x, sample_posterior=False)[0]


def test_psnr_and_ssim_on_a_known_error():
    model = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4)
    x = torch.zeros(2, 3, 16, 16)
    metrics = model.quality_metrics(x, x + 0.2)             # [0, 1] error 0.1 -> MSE 0.01 -> 20 dB
    assert metrics["psnr"].item() == pytest.approx(20.0, abs=1e-4)
    assert model.quality_metrics(x, x)["ssim"].item() == pytest.approx(1.0)
    assert "lpips" not in metrics


def test_log_images_keys_ranges_and_mode():
    batch = {"image": torch.rand(3, 3, 32, 32) * 2 - 1}
    kl = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4)
    vq = VQModel(ddconfig(double_z=False), {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4)
    for model, keys in ((kl, {"inputs", "reconstructions", "samples"}), (vq, {"inputs", "reconstructions"})):
        model.train()
        images = model.log_images(batch, N=2, split="train")
        assert set(images) == keys and model.training
        for v in images.values():
            assert v.shape == (2, 3, 32, 32) and v.min() >= -1 and v.max() <= 1
    assert int(vq.quantize.steps_unused.sum()) == 0                 # eval mode: no codebook bookkeeping


def test_segmentation_input_is_one_hot_and_colorized():
    cfg = ddconfig(in_channels=5, out_ch=5)
    model = VQModel(cfg | {"double_z": False}, {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4,
                    image_key="segmentation", colorize_nlabels=5)
    seg = torch.randint(0, 5, (2, 32, 32))
    x = model.get_input({"segmentation": seg})
    assert x.shape == (2, 5, 32, 32) and torch.equal(x.argmax(1), seg)
    assert model.log_images({"segmentation": seg})["inputs"].shape == (2, 3, 32, 32)


def test_bad_batches_and_untrainable_config_give_clear_errors():
    model = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4)
    with pytest.raises(KeyError, match="image_key"):
        model.get_input({"img": torch.zeros(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="channels-first"):
        model.get_input({"image": torch.zeros(1, 32, 32, 3)})
    with pytest.raises(ConfigError, match="lossconfig"):
        model.configure_optimizers()
    with pytest.raises(ConfigError, match="double_z"):
        AutoencoderKL(ddconfig(double_z=False), {"target": "torch.nn.Identity"}, embed_dim=4)
    with pytest.raises(ConfigError, match="double_z"):
        VQModel(ddconfig(), {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4)


def test_vq_model_interface_encodes_pre_quant_and_decodes_through_codebook():
    cfg = ddconfig(double_z=False)
    vq = VQModel(cfg, {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4).eval()
    iface = VQModelInterface(cfg, {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4).eval()
    iface.load_state_dict(vq.state_dict())
    x = torch.randn(2, 3, 32, 32)
    h = iface.encode(x)
    assert torch.equal(h, vq.encode(x, return_pre_quant=True))
    quant, _, info = vq.encode(x)
    assert torch.allclose(iface.decode(h), vq.decode(quant))
    assert torch.allclose(iface.decode(quant, force_not_quantize=True), vq.decode(quant))
    dec, _, idx = vq(x, return_pred_indices=True)
    assert torch.allclose(vq.decode_code(idx.view(2, 16, 16)), dec, atol=1e-5)


# ---- checkpoints -----------------------------------------------------------------------------------------------
def _save(path: Path, sd: dict) -> str:
    torch.save({"state_dict": sd, "global_step": 7}, path)
    return str(path)


def test_checkpoint_round_trip_strips_training_loss(tmp_path):
    trained = AutoencoderKL(ddconfig(), kl_loss(perceptual_weight=1.0), embed_dim=4)
    path = _save(tmp_path / "kl.ckpt", trained.state_dict())
    inference = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=path)
    for k, v in inference.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k
    ldm_style = {f"first_stage_model.{k}": v for k, v in inference.state_dict().items()}
    ldm_style["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    again = AutoencoderKL(ddconfig(), kl_loss(), embed_dim=4, use_ema=True,
                          ckpt_path=_save(tmp_path / "ldm.ckpt", ldm_style))   # loss and EMA kept at init
    assert torch.equal(again.decoder.conv_out.weight, trained.decoder.conv_out.weight)
    assert torch.equal(again.model_ema.decoderconv_outweight, trained.decoder.conv_out.weight)


def test_checkpoint_mismatches_are_reported(tmp_path):
    sd = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4).state_dict()
    extra = _save(tmp_path / "extra.ckpt", sd | {"encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"unexpected key\(s\) \['encoder.bogus.weight'\]"):
        AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=extra)
    partial = _save(tmp_path / "partial.ckpt", {k: v for k, v in sd.items() if not k.startswith("decoder.")})
    with pytest.raises(RuntimeError, match="missing key.*decoder.conv_in"):
        AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=partial)
    model = AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=partial,
                          ignore_keys=["decoder."])
    assert torch.equal(model.encoder.conv_in.weight, sd["encoder.conv_in.weight"])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        AutoencoderKL(ddconfig(), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=str(tmp_path / "nope.ckpt"))
    wrong = _save(tmp_path / "wrong.ckpt", sd)
    with pytest.raises(RuntimeError, match=r"(?s)wrong.ckpt.*size mismatch for encoder.conv_out.weight"):
        AutoencoderKL(ddconfig(z_channels=8), {"target": "torch.nn.Identity"}, embed_dim=4, ckpt_path=wrong)


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file
    vq = VQModel(ddconfig(double_z=False), {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4)
    sd = {k: v for k, v in vq.state_dict().items() if k != "quantize.steps_unused"}  # CompVis VQ file
    save_file(sd, str(tmp_path / "vq.safetensors"))
    loaded = VQModelInterface(ddconfig(double_z=False), {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4,
                              ckpt_path=str(tmp_path / "vq.safetensors"))
    assert torch.equal(loaded.quantize.embedding.weight, vq.quantize.embedding.weight)


# ---- configs -------------------------------------------------------------------------------------------------
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
FULL_SIZE = {"kl_f4": 4, "kl_f8": 8, "kl_f16": 16, "vq_f4": 4, "vq_f8": 8, "vq_f16": 16}


def test_every_expected_config_exists():
    names = {p.stem for p in CONFIGS}
    assert set(FULL_SIZE) | {"kl_f4_photos_tiny", "vq_f4_photos_tiny", "kl_f4_shapes_tiny", "kl_f2_shapes_tiny",
                             "kl_f8_photos_tiny"} <= names


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem not in FULL_SIZE], ids=lambda p: p.stem)
def test_tiny_config_instantiates_and_reconstructs(path):
    cfg = OmegaConf.load(path)
    model = instantiate_from_config(cfg.model)
    instantiate_from_config(cfg.data)
    res = cfg.model.params.ddconfig.resolution
    x = torch.rand(2, 3, res, res) * 2 - 1
    xrec = model(x)[0]
    assert xrec.shape == x.shape and torch.isfinite(xrec).all()
    if "photos" in path.stem:                   # mostly reconstruction, GAN phase reached at the end
        disc_start, max_steps = cfg.model.params.lossconfig.params.disc_start, cfg.lightning.trainer.max_steps
        assert 0.5 * max_steps < disc_start < max_steps
    assert cfg.lightning.callbacks.image_logger.params.max_images == 4


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_config_instantiates_on_meta_device(name):
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["data.params.train.params.root=/data/photos"]))
    assert cfg.data.params.validation.params.root == "/data/photos"      # one override feeds both splits
    cfg.model.params.lossconfig.params.lpips_pretrained_backbone = False  # no download in tests
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
        f = FULL_SIZE[name]
        x = torch.empty(1, 3, 256, 256)
        latent = model.encode(x).mode() if name.startswith("kl") else model.encode(x, return_pre_quant=True)
    assert latent.shape == (1, cfg.model.params.embed_dim, 256 // f, 256 // f)
    assert cfg.model.base_learning_rate == 4.5e-6
