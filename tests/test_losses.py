"""ldm/losses: GAN pieces, PatchGAN/ActNorm, frozen LPIPS, KL/VQ autoencoder losses."""
import math
import os
import urllib.error

import pytest
import torch
import torch.nn as nn

from ldm.losses import (ActNorm, LPIPSWithDiscriminator, NLayerDiscriminator, VQLPIPSWithDiscriminator,
                        adaptive_weight, adopt_weight, build_lpips, hinge_d_loss, vanilla_d_loss, weights_init)
from ldm.util import ConfigError, instantiate_from_config

TINY = dict(disc_ndf=8, perceptual_weight=0.0)  # small D, no LPIPS: fast


class CountingDisc(nn.Module):
    """Wraps a discriminator and counts its forward calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def tiny_autoencoder_step(seed=0):
    """A 'decoder' whose last layer is a 1x1 conv, so last_layer has a real graph to the losses."""
    torch.manual_seed(seed)
    conv_out = nn.Conv2d(4, 3, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = torch.tanh(conv_out(torch.randn(2, 4, 32, 32)))
    return x, x_hat, conv_out


@pytest.fixture(scope="module")
def kl_loss_with_lpips():
    torch.manual_seed(0)
    return LPIPSWithDiscriminator(disc_start=0, disc_ndf=8, perceptual_weight=0.5, lpips_pretrained_backbone=False)


# ---- gan.py -------------------------------------------------------------------------------------

def test_hinge_d_loss_hand_computed():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_vanilla_d_loss_hand_computed():
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    l3 = torch.tensor([math.log(3.0)])
    # softplus(-log 3) = log(4/3), softplus(log 3) = log 4
    assert vanilla_d_loss(l3, l3).item() == pytest.approx(0.5 * (math.log(4 / 3) + math.log(4)))


def test_adopt_weight_gates_on_threshold():
    assert adopt_weight(0.7, 9, threshold=10) == 0.0
    assert adopt_weight(0.7, 9, threshold=10, value=0.3) == 0.3
    assert adopt_weight(0.7, 10, threshold=10) == 0.7


def test_adaptive_weight_linear_last_layer():
    weight = torch.zeros(1, 2, requires_grad=True)     # last layer y = W u
    u = torch.tensor([3.0, 4.0])
    y = weight @ u                                       # (1,)
    nll = 2.0 * y.sum()                                  # d nll / dW = 2u -> norm 10
    g = -0.5 * y.sum()                                   # d g / dW = -u/2 -> norm 2.5
    lam = adaptive_weight(nll, g, weight, disc_weight=0.5)
    assert lam.item() == pytest.approx(10.0 / (2.5 + 1e-4) * 0.5)
    assert not lam.requires_grad


def test_adaptive_weight_is_clamped():
    weight = torch.zeros(2, requires_grad=True)
    nll = (weight * torch.tensor([3.0, 4.0])).sum()      # grad norm 5
    g = (weight * 0.0).sum()                             # zero grad -> 5 / 1e-4 = 5e4 > 1e4
    assert adaptive_weight(nll, g, weight, disc_weight=2.0).item() == pytest.approx(2.0e4)


# ---- discriminator.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_actnorm", [False, True])
def test_discriminator_patch_logits_shape(use_actnorm):
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3, use_actnorm=use_actnorm)
    # 64 -> 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (4x4, stride 1, pad 1)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_discriminator_key_layout_matches_compvis():
    keys = set(NLayerDiscriminator(ndf=64).state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.8.weight",
            "main.9.weight", "main.11.weight", "main.11.bias"} <= keys
    assert "main.2.bias" not in keys                     # BatchNorm convs carry no bias
    assert tuple(NLayerDiscriminator(ndf=64).state_dict()["main.8.weight"].shape) == (512, 256, 4, 4)
    act_keys = set(NLayerDiscriminator(ndf=64, use_actnorm=True).state_dict())
    assert {"main.2.bias", "main.3.loc", "main.3.scale", "main.3.initialized"} <= act_keys


def test_weights_init_statistics():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64).apply(weights_init)
    assert disc.main[5].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc.main[5].weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert disc.main[6].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.all(disc.main[6].bias == 0)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    norm = ActNorm(4)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.5, 2.0])[None, :, None, None] + 7.0
    y = norm(x)                                          # first training batch initialises
    assert norm.initialized.item() == 1
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    loc = norm.loc.detach().clone()
    norm(torch.randn(8, 4, 5, 5))                        # later batches do not re-initialise
    assert torch.equal(norm.loc, loc)


def test_actnorm_does_not_initialise_in_eval_or_after_loading():
    fresh = ActNorm(2).eval()
    fresh(torch.randn(4, 2, 3, 3) + 5)
    assert fresh.initialized.item() == 0
    trained = ActNorm(2)
    trained.load_state_dict({"loc": torch.ones(1, 2, 1, 1), "scale": torch.full((1, 2, 1, 1), 2.0),
                             "initialized": torch.tensor(1, dtype=torch.uint8)})
    x = torch.randn(4, 2, 3, 3)
    assert torch.allclose(trained(x), 2.0 * (x + 1.0))


# ---- lpips.py -----------------------------------------------------------------------------------

def test_random_backbone_lpips_zero_on_identical_positive_on_different(kl_loss_with_lpips):
    lpips_net = kl_loss_with_lpips.perceptual_loss
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(lpips_net(x, x) == 0)
    d = lpips_net(x, torch.rand_like(x) * 2 - 1)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)


def test_lpips_is_frozen_and_stays_eval(kl_loss_with_lpips):
    lpips_net = kl_loss_with_lpips.perceptual_loss
    assert not any(p.requires_grad for p in lpips_net.parameters())
    kl_loss_with_lpips.train()
    assert kl_loss_with_lpips.training and kl_loss_with_lpips.discriminator.training
    assert not any(m.training for m in lpips_net.modules())


def test_lpips_key_layout_matches_compvis(kl_loss_with_lpips):
    keys = set(kl_loss_with_lpips.perceptual_loss.state_dict())
    expected = {"scaling_layer.shift", "scaling_layer.scale"}
    expected |= {f"lin{i}.model.1.weight" for i in range(5)}
    slices = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    expected |= {f"net.slice{s}.{i}.{p}" for s, idx in slices.items() for i in idx for p in ("weight", "bias")}
    assert keys == expected


def test_pretrained_backbone_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if torch.hub.get_dir() != os.path.join(str(tmp_path), "hub"):
        pytest.skip("torch.hub.set_dir() was called in this process; cannot isolate the weights cache")

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        build_lpips(pretrained_backbone=True)
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert "lpips_pretrained_backbone: false" in message


def test_build_lpips_rejects_unknown_net():
    with pytest.raises(ValueError, match="net must be one of"):
        build_lpips(pretrained_backbone=False, net="resnet")


# ---- autoencoder_loss.py ------------------------------------------------------------------------

def test_gan_terms_gated_before_disc_start():
    loss = LPIPSWithDiscriminator(disc_start=100, **TINY)
    loss.discriminator = CountingDisc(loss.discriminator)
    x, x_hat, conv_out = tiny_autoencoder_step()
    assert not loss.disc_active(99)
    g_total, log = loss.generator_loss(x, x_hat, torch.tensor(0.0), 99, last_layer=conv_out.weight)
    d_total, dlog = loss.discriminator_loss(x, x_hat.detach(), 99)
    assert loss.discriminator.calls == 0
    assert log["train/g_loss"] == 0 and log["train/d_weight"] == 0 and log["train/disc_factor"] == 0
    assert d_total == 0 and dlog["train/logits_real"] == 0
    d_total.backward()                                   # a zero the caller may still backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert g_total.item() == pytest.approx(log["train/nll_loss"].item())


def test_gan_terms_active_after_disc_start():
    loss = LPIPSWithDiscriminator(disc_start=100, **TINY)
    loss.discriminator = CountingDisc(loss.discriminator)
    x, x_hat, conv_out = tiny_autoencoder_step()
    assert loss.disc_active(100)
    g_total, log = loss.generator_loss(x, x_hat, torch.tensor(0.0), 100, last_layer=conv_out.weight)
    assert loss.discriminator.calls == 1
    assert log["train/g_loss"] != 0 and log["train/d_weight"] > 0 and log["train/disc_factor"] == 1
    expected = log["train/nll_loss"] + log["train/d_weight"] * log["train/g_loss"]
    assert g_total.item() == pytest.approx(expected.item(), rel=1e-5)
    d_total, dlog = loss.discriminator_loss(x, x_hat.detach(), 100)
    assert loss.discriminator.calls == 3 and d_total > 0
    d_total.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert conv_out.weight.grad is None                  # reconstructions are detached for D


def test_disc_factor_zero_never_runs_discriminator():
    loss = VQLPIPSWithDiscriminator(disc_start=0, disc_factor=0.0, **TINY)
    loss.discriminator = CountingDisc(loss.discriminator)
    x, x_hat, conv_out = tiny_autoencoder_step()
    loss.generator_loss(x, x_hat, torch.tensor(0.0), 10, last_layer=conv_out.weight)
    assert not loss.disc_active(10) and loss.discriminator.calls == 0


def test_eval_without_grad_uses_zero_adaptive_weight():
    loss = LPIPSWithDiscriminator(disc_start=0, **TINY).eval()
    x, x_hat, _ = tiny_autoencoder_step()
    with torch.no_grad():
        total, log = loss.generator_loss(x, x_hat, torch.tensor(0.0), 5, last_layer=None, split="val")
    assert log["val/d_weight"] == 0 and log["val/g_loss"] != 0
    assert total.item() == pytest.approx(log["val/nll_loss"].item())


def test_training_without_last_layer_is_an_error():
    loss = LPIPSWithDiscriminator(disc_start=0, **TINY)
    x, x_hat, _ = tiny_autoencoder_step()
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(x, x_hat, torch.tensor(0.0), 5)


def test_logvar_gets_gradient_and_belongs_to_autoencoder_optimizer():
    loss = LPIPSWithDiscriminator(disc_start=0, logvar_init=0.5, **TINY)
    assert loss.logvar.shape == () and loss.logvar.item() == 0.5
    assert [p is loss.logvar for p in loss.autoencoder_parameters()] == [True]
    assert all(p is not loss.logvar for p in loss.discriminator.parameters())
    x, x_hat, conv_out = tiny_autoencoder_step()
    total, _ = loss.generator_loss(x, x_hat, torch.tensor(0.0), 5, last_layer=conv_out.weight)
    total.backward()
    assert loss.logvar.grad is not None and loss.logvar.grad != 0
    assert list(VQLPIPSWithDiscriminator(disc_start=0, **TINY).autoencoder_parameters()) == []


def test_kl_reduction_sum_per_image_with_logvar():
    loss = LPIPSWithDiscriminator(disc_start=10, kl_weight=0.1, logvar_init=math.log(2.0), **TINY)
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    total, log = loss.generator_loss(x, x_hat, torch.tensor(3.0), 0)
    per_image = 3 * 4 * 4 * (0.5 / 2.0 + math.log(2.0))  # sum over pixels of rec/exp(logvar) + logvar
    assert log["train/nll_loss"].item() == pytest.approx(per_image)
    assert log["train/rec_loss"].item() == pytest.approx(0.5)
    assert log["train/kl_loss"].item() == pytest.approx(3.0)
    assert log["train/logvar"].item() == pytest.approx(math.log(2.0))
    assert total.item() == pytest.approx(per_image + 0.1 * 3.0)


def test_vq_reduction_mean_and_l2_and_pixel_weight():
    loss = VQLPIPSWithDiscriminator(disc_start=10, codebook_weight=2.0, pixel_loss="l2", pixelloss_weight=3.0,
                                    **TINY)
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full_like(x, 0.5)
    total, log = loss.generator_loss(x, x_hat, torch.tensor(0.25), 0)
    assert log["train/nll_loss"].item() == pytest.approx(3.0 * 0.25)
    assert total.item() == pytest.approx(3.0 * 0.25 + 2.0 * 0.25)


def test_kl_loss_includes_lpips_per_pixel(kl_loss_with_lpips):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = torch.rand_like(x) * 2 - 1
    with torch.no_grad():
        p = kl_loss_with_lpips.perceptual_loss(x, x_hat).flatten()
        _, log = kl_loss_with_lpips.eval().generator_loss(x, x_hat, torch.tensor(0.0), 0, split="val")
    pixels = 3 * 32 * 32
    expected = (x - x_hat).abs().sum() / 2 + 0.5 * p.mean() * pixels   # logvar = 0
    assert log["val/p_loss"].item() == pytest.approx(p.mean().item())
    assert log["val/nll_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_log_keys_and_detached():
    x, x_hat, conv_out = tiny_autoencoder_step()
    common = {"total_loss", "rec_loss", "nll_loss", "p_loss", "d_weight", "disc_factor", "g_loss"}
    for cls, extra in ((LPIPSWithDiscriminator, {"kl_loss", "logvar"}), (VQLPIPSWithDiscriminator, {"quant_loss"})):
        loss = cls(disc_start=0, **TINY)
        _, log = loss.generator_loss(x, x_hat, torch.tensor(0.1), 0, last_layer=conv_out.weight, split="train")
        assert set(log) == {f"train/{k}" for k in common | extra}
        assert all(v.dim() == 0 and not v.requires_grad for v in log.values())
        _, dlog = loss.discriminator_loss(x, x_hat.detach(), 0, split="val")
        assert set(dlog) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}


def test_perceptual_weight_zero_builds_no_lpips():
    loss = LPIPSWithDiscriminator(disc_start=0, **TINY)
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())


def test_full_state_dict_layout(kl_loss_with_lpips):
    keys = set(kl_loss_with_lpips.state_dict())
    assert {"logvar", "discriminator.main.0.weight", "perceptual_loss.lin0.model.1.weight",
            "perceptual_loss.net.slice1.0.weight"} <= keys
    assert not any(k.startswith("perceptual_loss.lins") for k in keys)


def test_compvis_yaml_params_instantiate():
    kl = instantiate_from_config({"target": "ldm.losses.LPIPSWithDiscriminator", "params": {
        "disc_start": 50001, "kl_weight": 1.0e-6, "disc_weight": 0.5, "perceptual_weight": 0.0}})
    assert kl.kl_weight == 1.0e-6 and kl.disc_start == 50001
    vq = instantiate_from_config({"target": "ldm.losses.autoencoder_loss.VQLPIPSWithDiscriminator", "params": {
        "disc_conditional": False, "disc_in_channels": 3, "disc_start": 0, "disc_weight": 0.75,
        "codebook_weight": 1.0, "n_classes": 8192, "perceptual_loss": "lpips", "perceptual_weight": 0.0}})
    assert vq.codebook_weight == 1.0 and vq.disc_weight == 0.75


@pytest.mark.parametrize("cls, bad, match", [
    (LPIPSWithDiscriminator, {"disc_conditional": True}, "disc_conditional"),
    (LPIPSWithDiscriminator, {"disc_loss": "wgan"}, "disc_loss"),
    (VQLPIPSWithDiscriminator, {"pixel_loss": "l3"}, "pixel_loss"),
    (VQLPIPSWithDiscriminator, {"perceptual_loss": "clips"}, "perceptual_loss"),
])
def test_unsupported_options_raise(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls(disc_start=0, **TINY, **bad)


def test_mismatched_shapes_raise():
    loss = VQLPIPSWithDiscriminator(disc_start=0, **TINY)
    with pytest.raises(ValueError, match="same shape"):
        loss.generator_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4), torch.tensor(0.0), 0)
