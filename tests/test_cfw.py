"""StableSR's CFW: fusion blocks, the fusing decoder (w = 0 is the plain decoder), the released key layout, the
Lightning module's frozen training, the CFW loss, the saved-triples dataset, tiled decoding with features."""
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from ldm.data.cfw_pairs import CFWPairs, save_cfw_pair
from ldm.loading import load_model
from ldm.losses.cfw_loss import CFWLoss
from ldm.models.cfw import CFWAutoencoder
from ldm.modules.autoencoder.cfw import RRDB, FusionBlock, FusionDecoder, ResidualDenseBlock
from ldm.modules.autoencoder.model import Decoder, Encoder
from ldm.superres.tiling import tiled_decode
from ldm.util import instantiate_from_config
from tests.test_compat import TRAINING_LOSS, autoencoder_layout, parameters_on_meta

SD_VAE = dict(double_z=True, z_channels=4, resolution=512, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
TINY = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
            num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def fusion_layout(ch, ch_mult, grow=32, num_block=2, **_):
    """StableSR's `decoder.fusion_layer_{i}` keys and shapes (STABLESR.md sec. f / n), written independently."""
    shapes = {}

    def conv(p, c_in, c_out, k):
        shapes.update({f"{p}.weight": (c_out, c_in, k, k), f"{p}.bias": (c_out,)})

    def res(p, c_in, c_out):
        shapes.update({f"{p}.norm1.weight": (c_in,), f"{p}.norm1.bias": (c_in,), f"{p}.norm2.weight": (c_out,),
                       f"{p}.norm2.bias": (c_out,)})
        conv(f"{p}.conv1", c_in, c_out, 3), conv(f"{p}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{p}.conv_out", c_in, c_out, 1)

    for i in range(1, len(ch_mult) - 1):
        c, p = ch * ch_mult[i], f"decoder.fusion_layer_{i}"
        res(f"{p}.encode_enc_1", 2 * c, c), res(f"{p}.encode_enc_3", c, c)
        for b in range(num_block):
            for r in (1, 2, 3):
                for k in range(1, 6):
                    conv(f"{p}.encode_enc_2.{b}.rdb{r}.conv{k}", c + (k - 1) * grow, c if k == 5 else grow, 3)
    return shapes


def released_yaml(ddconfig):
    return {"model": {"base_learning_rate": 5.0e-5, "target": "ldm.models.autoencoder.AutoencoderKLResi",
                      "params": {"monitor": "val/rec_loss", "embed_dim": 4, "fusion_w": 1.0, "freeze_dec": True,
                                 "synthesis_data": False, "image_key": "gt", "ddconfig": ddconfig,
                                 "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                                "params": {"disc_start": 501, "kl_weight": 0, "disc_weight": 0.025,
                                                           "disc_factor": 1.0}}}}}


# ----------------------------------------------------------------------------- networks

def test_full_size_layout_is_stablesr_s():
    with parameters_on_meta():
        dec = FusionDecoder(**SD_VAE)
    fusion = {k: tuple(v.shape) for k, v in dec.state_dict().items() if k.startswith("fusion_layer")}
    expected = {k[len("decoder."):]: v for k, v in fusion_layout(**SD_VAE).items()}
    assert fusion == expected
    assert len(fusion) == 156 and sum(torch.Size(s).numel() for s in fusion.values()) == 44_393_728


def test_fusion_block_is_linear_in_w_and_rrdb_is_residual():
    torch.manual_seed(0)
    block = FusionBlock(32, num_block=1)
    enc, dec = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
    full, half = block(enc, dec, 1.0) - dec, block(enc, dec, 0.5) - dec
    torch.testing.assert_close(half, 0.5 * full)
    assert torch.equal(block(enc, dec, 0.0), dec)
    rdb = ResidualDenseBlock(64)
    fan_in = 64 * 9
    assert abs(rdb.conv1.weight.std().item() - 0.1 * (2 / fan_in) ** 0.5) < 0.01 * (2 / fan_in) ** 0.5 * 2
    assert (rdb.conv1.bias == 0).all()
    rrdb = RRDB(16)
    for r in (rrdb.rdb1, rrdb.rdb2, rrdb.rdb3):
        torch.nn.init.zeros_(r.conv5.weight)
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(rrdb.rdb1(x), x)               # dense block: x + 0.2 * conv5(...) = x
    torch.testing.assert_close(rrdb(x), 1.2 * x)              # RRDB: x + 0.2 * rdb3(rdb2(rdb1(x)))


@torch.no_grad()
def test_w_zero_or_no_features_is_the_plain_decoder():
    torch.manual_seed(0)
    fused, plain = FusionDecoder(**TINY), Decoder(**TINY)
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if not k.startswith("fusion_layer")})
    enc = Encoder(**TINY)
    x = torch.randn(1, 3, 32, 48)
    moments, feats = enc(x, return_features=True)
    z = moments[:, :4]
    ref = plain(z)
    assert torch.equal(fused(z), ref) and torch.equal(fused(z, feats, w=0.0), ref)
    out = fused(z, feats, w=1.0)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    fused.fusion_w = 0.0
    assert torch.equal(fused(z, feats), ref)
    with pytest.raises(ValueError, match="fusion_layer_1 needs the encoder's level-1 feature"):
        fused(z, [f[..., :8, :8] for f in feats], w=1.0)


# ----------------------------------------------------------------------------- Lightning module and loss

def cfw_model(**kw):
    torch.manual_seed(0)
    loss = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": {"disc_start": 0, "kl_weight": 0, "disc_weight": 0.025, "lpips_pretrained_backbone": False,
                       "disc_ndf": 8, "disc_num_layers": 2}}
    return CFWAutoencoder(TINY, loss, embed_dim=4, **kw)


def test_freezing_and_the_stablesr_loss():
    model = cfw_model()
    assert isinstance(model.loss, CFWLoss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("fusion_layer" in n or n.startswith("loss.discriminator.") for n in trainable)
    assert {id(p) for p in model.generator_parameters()} == \
        {id(p) for n, p in model.named_parameters() if "fusion_layer" in n}
    loss = model.loss.train()
    x, xrec = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32, requires_grad=True) * 2 - 1
    total, log = loss.generator_loss(x, xrec, torch.zeros(()), 10, last_layer=model.get_last_layer())
    assert log["train/d_weight"].item() == pytest.approx(0.025)       # fixed: the last layer is frozen
    rec = (x - xrec).abs() + loss.perceptual_loss(x, xrec)
    assert log["train/nll_loss"].item() == pytest.approx(rec.mean().item(), rel=1e-5)
    assert total.item() == pytest.approx(rec.mean().item() + 0.025 * log["train/g_loss"].item(), rel=1e-5)


def test_training_moves_only_the_fusion_layers(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_cfw_pair(tmp_path, f"{i:04d}", torch.rand(3, 32, 32, generator=g) * 2 - 1,
                      torch.rand(3, 32, 32, generator=g) * 2 - 1, torch.randn(4, 8, 8, generator=g) * 0.18215)
    data = torch.utils.data.DataLoader(CFWPairs(tmp_path), batch_size=2)
    model = cfw_model()
    model.learning_rate = 1e-3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(model, data)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any("fusion_layer" in k for k in changed) and any(k.startswith("loss.discriminator.") for k in changed)
    assert all("fusion_layer" in k or k.startswith("loss.discriminator.") for k in changed), sorted(changed)[:5]
    images = model.log_images(next(iter(data)))
    assert set(images) == {"inputs", "gts", "reconstructions", "plain_decode"}


def test_released_yaml_and_checkpoint_load_strictly(tmp_path):
    layout = autoencoder_layout(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4, embed_dim=4)
    layout |= fusion_layout(ch=32, ch_mult=[1, 2, 2]) | TRAINING_LOSS
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in layout.items()}
    torch.save({"state_dict": sd}, tmp_path / "cfw.ckpt")
    (tmp_path / "cfw.yaml").write_text(yaml.safe_dump(released_yaml(TINY)))
    model = load_model(tmp_path / "cfw.yaml", tmp_path / "cfw.ckpt")
    assert isinstance(model, CFWAutoencoder)
    own = model.state_dict()
    assert own.keys() == {k for k in sd if not k.startswith("loss.")}
    assert all(torch.equal(v, sd[k]) for k, v in own.items())
    cfg = released_yaml(TINY)["model"]
    cfg["params"]["lossconfig"]["params"]["lpips_pretrained_backbone"] = False
    assert isinstance(instantiate_from_config(cfg).loss, CFWLoss)
    cfg["params"]["synthesis_data"] = True
    with pytest.raises(ValueError, match="synthesis_data"):
        instantiate_from_config(cfg)


def test_an_sd_vae_checkpoint_starts_cfw_training(tmp_path):
    plain = {k: v for k, v in cfw_model().state_dict().items() if "fusion_layer" not in k and not k.startswith("loss.")}
    plain = {k: torch.randn_like(v) for k, v in plain.items()}
    torch.save({"state_dict": plain}, tmp_path / "vae.ckpt")
    model = cfw_model(ckpt_path=str(tmp_path / "vae.ckpt"))
    assert torch.equal(model.decoder.conv_in.weight, plain["decoder.conv_in.weight"])


# ----------------------------------------------------------------------------- data and tiled decoding

def test_cfw_pairs_round_trip_and_errors(tmp_path):
    lq, gt, latent = torch.rand(3, 16, 24) * 2 - 1, torch.rand(3, 16, 24) * 2 - 1, torch.randn(4, 2, 3)
    save_cfw_pair(tmp_path, "a", lq, gt, latent)
    s = CFWPairs(tmp_path)[0]
    assert s["file_name"] == "a" and torch.equal(s["latent"], latent)
    assert (s["lq"] - lq).abs().max() <= 1 / 127.5 and (s["gt"] - gt).abs().max() <= 1 / 127.5
    np.save(tmp_path / "latents" / "b.npy", latent[None].numpy())
    with pytest.raises(ValueError, match="1 name.*lack.*b"):
        CFWPairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="gts"):
        CFWPairs(tmp_path / "nowhere")


@torch.no_grad()
def test_tiled_cfw_decode_with_one_tile_equals_untiled():
    model = cfw_model().eval()
    lq = torch.rand(1, 3, 32, 48) * 2 - 1
    posterior, feats = model.encode_with_features(lq)
    z = posterior.mode()
    tiled = tiled_decode(lambda zt, ft: model.decode(zt, ft, w=0.5), z, tile=16, overlap=4, extra=feats)
    torch.testing.assert_close(tiled, model.decode(z, feats, w=0.5), atol=1e-5, rtol=0)
    multi = tiled_decode(lambda zt, ft: model.decode(zt, ft, w=0.5), z, tile=8, overlap=4, extra=feats)
    assert multi.shape == (1, 3, 32, 48)
