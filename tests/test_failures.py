"""Failures that must lose nothing (a full disk or a crash while saving, NaN/inf losses) and bad input that gets
one clear message (images not a multiple of f, layout boxes outside [0, 1], prompts longer than the encoder, a
checkpoint of another architecture)."""
import errno
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import main
from ldm.callbacks import SetupCallback
from ldm.models.ddpm import DDPM
from ldm.models.nonfinite import NonFiniteLossError
from tests.test_ddpm import images, make_ddpm
from tests.test_main import TOY

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_yaml(tmp_path) -> str:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY))
    return str(path)


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def only_run(logs: Path) -> Path:
    [run] = [p for p in logs.iterdir() if p.is_dir()]
    return run


# ---------------------------------------------------------------- saving

def test_full_disk_during_a_save_keeps_the_previous_last_ckpt(tmp_path, toy_yaml, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):  # the third checkpoint hits a full disk halfway through
        if isinstance(obj, dict) and obj.get("global_step") == 3:
            real_save(obj, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    logs = tmp_path / "logs"
    code = main.main(["-b", toy_yaml, "-t", "-l", str(logs), "--max_steps", "5",
                      "lightning.callbacks.last_checkpoint.params.every_n_train_steps=1"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "the previous file is intact" in err
    checkpoints = only_run(logs) / "checkpoints"
    assert load(checkpoints / "last.ckpt")["global_step"] == 2
    assert not list(checkpoints.glob(".*.tmp"))


CRASH = """
import os, signal, sys, torch
from ldm.checkpoint import save_checkpoint_atomic
save_checkpoint_atomic({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
real_save = torch.save
def crash(obj, path, *args, **kwargs):  # the machine dies halfway through the next save
    real_save(obj, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = crash
save_checkpoint_atomic({"global_step": 2, "w": torch.zeros(1000)}, sys.argv[1])
"""


@pytest.mark.slow
def test_a_crash_during_a_save_keeps_the_previous_last_ckpt_and_the_next_run_clears_the_debris(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(ckpt)], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert load(ckpt)["global_step"] == 1 and torch.equal(load(ckpt)["w"], torch.ones(1000))
    [debris] = list(ckpt.parent.glob(".last.ckpt.*.tmp"))
    setup = SetupCallback("now", str(tmp_path), str(ckpt.parent), str(tmp_path / "configs"), {}, {})
    setup.setup(types.SimpleNamespace(is_global_zero=True), None, "fit")
    assert not debris.exists() and ckpt.exists()


# ---------------------------------------------------------------- NaN / inf losses

def test_a_nonfinite_loss_skips_its_step_and_leaves_weights_moments_and_ema_alone():
    model = make_ddpm(max_nonfinite_steps=2)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)

    def step(poison: bool) -> None:
        def closure():
            opt.zero_grad()
            loss = model.training_step({"image": images() * (math.nan if poison else 1.0)}, 0)
            loss.backward()
            return loss
        model.optimizer_step(0, 0, opt, closure)

    step(poison=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in opt.state[next(iter(model.model.parameters()))].items()}
    with pytest.warns(UserWarning, match="the loss is nan; skipping this step \\(1 in a row; training stops at 2\\)"):
        step(poison=True)
    assert model.nonfinite_streak == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights, EMA, its counter
    after = opt.state[next(iter(model.model.parameters()))]
    assert all(torch.equal(v, after[k]) for k, v in moments.items())
    step(poison=False)
    assert model.nonfinite_streak == 0 and not torch.equal(model.model_ema.num_updates, before["model_ema.num_updates"])
    with pytest.warns(UserWarning):
        step(poison=True)
    with pytest.raises(NonFiniteLossError, match="NaN/inf in 2 steps in a row"):
        step(poison=True)


DDPM_TINY = ["model.params.image_size=16", "model.params.unet_config.params.image_size=16",
             "model.params.unet_config.params.model_channels=16", "model.params.unet_config.params.norm_num_groups=8",
             "model.params.unet_config.params.num_head_channels=16", "model.params.max_nonfinite_steps=3",
             "data.params.batch_size=2", "data.params.train.params={split: train, size: 16, length: 8}",
             "data.params.validation.params={split: validation, size: 16, length: 2}",
             "lightning.trainer.max_steps=8", "lightning.trainer.max_time=null",
             "lightning.callbacks.image_logger=null",
             "lightning.logger.target=pytorch_lightning.loggers.CSVLogger",
             "lightning.callbacks.last_checkpoint.params.every_n_train_steps=1"]


def test_nan_losses_in_a_row_stop_training_with_a_message_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                            capsys):
    real = DDPM.p_losses

    def p_losses(self, x0, cond, *args, **kwargs):  # the weights "diverge" from step 3 on
        loss, logs = real(self, x0, cond, *args, **kwargs)
        return (loss * math.nan, logs) if self.training and self.global_step >= 3 else (loss, logs)

    monkeypatch.setattr(DDPM, "p_losses", p_losses)
    logs = tmp_path / "logs"
    code = main.main(["-b", str(REPO / "configs" / "diffusion" / "ddpm_shapes_tiny.yaml"), "-t", "-l", str(logs),
                      *DDPM_TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert ("training stopped at step 5: the loss was NaN/inf in 3 steps in a row (from step 3; "
            "model.params.max_nonfinite_steps=3)") in err and "last.ckpt holds the last good step" in err
    last = load(only_run(logs) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_autoencoder_skips_nan_steps_without_counting_them_and_stops_after_k(tmp_path, monkeypatch, capsys):
    from ldm.models.autoencoder import AutoencoderKL
    from tests.test_resume import AUTOENCODER

    real = AutoencoderKL._reconstruct

    def reconstruct(self, x):  # the decoder "diverges" at step 2
        xrec, reg, logs = real(self, x)
        return (xrec * math.nan if self.training and self.global_step >= 2 else xrec), reg, logs

    monkeypatch.setattr(AutoencoderKL, "_reconstruct", reconstruct)
    config, _, overrides = AUTOENCODER
    logs = tmp_path / "logs"
    code = main.main(["-b", str(REPO / config), "-t", "-l", str(logs), *overrides, "model.params.max_nonfinite_steps=2",
                      "lightning.trainer.max_steps=6", "lightning.trainer.max_time=null",
                      "lightning.callbacks.last_checkpoint.params.every_n_train_steps=1"])
    assert code == 1
    assert "training stopped at step 2: the generator loss was NaN/inf in 2 steps in a row" in capsys.readouterr().err
    last = load(only_run(logs) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # skipped steps do not count
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------- bad input, one message each

def test_image_sizes_not_a_multiple_of_f_are_named():
    from tests.test_autoencoder import ddconfig, kl_loss
    from ldm.models.autoencoder import AutoencoderKL

    model = AutoencoderKL(ddconfig(ch_mult=[1, 1, 2]), kl_loss(), embed_dim=4)  # f = 4
    f = model.encoder.downsampling_factor
    with pytest.raises(ValueError, match=f"Encoder: image size 30x32 \\(HxW\\) is not a multiple of the "
                                         f"downsampling factor f={f} .* e.g. {30 // f * f}x32"):
        model.encode(torch.zeros(1, 3, 30, 32))


def test_layout_boxes_outside_0_1_are_named():
    from ldm.modules.encoders import LayoutEmbedder

    embedder = LayoutEmbedder(n_embed=16, n_layer=1, n_classes=3, max_objects=2, heads=2, dim_head=8)
    ok = torch.tensor([[[1, 0.1, 0.2, 0.5, 0.6], [-1, 0, 0, 0, 0]]])
    assert embedder(ok).shape == (1, 6, 16)
    for row, shown in (([2, 0.1, 0.2, 1.2, 0.6], "(2.0, 0.1, 0.2, 1.2, 0.6)"),
                       ([0, -0.1, 0.2, 0.5, 0.6], "(0.0, -0.1, 0.2, 0.5, 0.6)"),
                       ([0, 0.7, 0.2, 0.5, 0.6], "(0.0, 0.7, 0.2, 0.5, 0.6)")):
        with pytest.raises(ValueError) as info:
            embedder(torch.tensor([[row, [-1, 0, 0, 0, 0]]]))
        assert f"1 box(es) outside [0, 1] or with x0 > x1 / y0 > y1, e.g. (class, x0, y0, x1, y1) = {shown}" \
            in str(info.value)


def test_prompt_longer_than_the_encoder_is_named():
    from ldm.modules.encoders import FrozenTextEmbedder

    encoder = FrozenTextEmbedder(max_length=8)
    encoder.check_length(["a red circle"])
    with pytest.raises(ValueError, match="prompt 'a red circle above a small blue square' is 10 tokens long; the "
                                         "text encoder \\(FrozenTextEmbedder\\) reads at most 8"):
        encoder.check_length(["a red circle", "a red circle above a small blue square"])


def test_resuming_with_another_architecture_names_the_file_and_the_keys(tmp_path, toy_yaml, capsys):
    logs = tmp_path / "logs"
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs)]) == 0
    run = only_run(logs)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main.main(["-r", str(run), "-t", "model.params.embed_dim=5"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{ckpt}' does not fit ToyAutoencoder" in err
    assert "encoder.weight: file (2, 3, 1, 1), model (5, 3, 1, 1)" in err and "-r continues a run" in err
    assert "Traceback" not in err and load(ckpt)["global_step"] == 3  # nothing was overwritten
    kl = REPO / "configs" / "autoencoder" / "kl_f4_photos_tiny.yaml"  # a ckpt_path of another model
    assert main.main(["-b", str(kl), "-t", "-l", str(logs), f"model.params.ckpt_path={ckpt}"]) == 2
    assert f"checkpoint '{ckpt}' does not fit AutoencoderKL" in capsys.readouterr().err
