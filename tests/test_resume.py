"""Nothing lost: kill -9 and `-r` continue bit for bit; data order, RNG states and EMA in checkpoints; failed saves.

The two kill tests train tiny configs in deterministic mode: once uninterrupted (in this process), once in a
child process killed with SIGKILL at a random step (last.ckpt written every step), then resumed with `-r` (in
this process). Every step's loss after the resume point, and a digest of its batch, must equal the
uninterrupted run's bit for bit.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 14  # two epochs of 6 batches and two steps of a third

COMMON = ["lightning.trainer.max_steps=14", "lightning.trainer.deterministic=true",
          "lightning.trainer.accelerator=cpu", "lightning.trainer.enable_progress_bar=false",
          "lightning.trainer.enable_model_summary=false", "lightning.trainer.max_time=null",
          "lightning.trainer.num_sanity_val_steps=1",
          "lightning.logger.target=pytorch_lightning.loggers.CSVLogger",
          "lightning.callbacks.last_checkpoint.params.every_n_train_steps=1"]

# KL autoencoder with EMA, LR warm-up and the PatchGAN from step 1; random Photos crops (seeded per position).
AUTOENCODER = ("configs/autoencoder/kl_f4_photos_tiny.yaml", ["train/aeloss", "train/disc_loss"], [
    "model.params.ddconfig.ch=8", "model.params.ddconfig.resolution=16", "model.params.use_ema=true",
    "model.params.ema_decay=0.9", "model.params.lr_warmup_steps=4", "model.params.lossconfig.params.disc_start=1",
    "model.params.lossconfig.params.disc_ndf=8", "model.params.lossconfig.params.disc_num_layers=2",
    "data.params.batch_size=2", "data.params.train.params={split: train, size: 16, length: 12}",
    "data.params.validation.params={split: validation, size: 16, length: 2}"])

# Class-conditional LDM: EMA, warm-up, min-SNR weights, 10% condition dropout, scale_by_std, a trained conditioner.
LDM = ("configs/diffusion/ldm_shapes_class_tiny.yaml", ["train/loss", "train/loss_simple"], [
    "model.params.first_stage_config.params.ckpt_path=null", "model.params.allow_random_first_stage=true",
    "model.params.first_stage_cache_size=0", "model.params.unet_config.params.model_channels=16",
    "model.params.unet_config.params.norm_num_groups=8", "model.params.unet_config.params.num_head_channels=16",
    "model.params.ema_decay=0.9", "model.params.lr_warmup_steps=4",
    "data.params.batch_size=4", "data.params.train.params.length=24", "data.params.validation.params.length=4",
    "lightning.callbacks.image_logger.params.log_images_kwargs={N: 2, ddim_steps: 3, guidance_scale: 3.0}"])


def loss_log(path: Path, keys: list[str]) -> str:
    return f"lightning.callbacks.loss_log={{target: tests.toy_model.LossLog, params: {{path: {path}, keys: {keys}}}}}"


def lines(path: Path) -> list[str]:
    """The complete lines of a LossLog file (a kill can cut the last one short)."""
    text = path.read_text() if path.exists() else ""
    return text[:text.rfind("\n") + 1].splitlines()


def kill_at(args: list[str], log: Path, step: int, timeout: float = 600) -> None:
    """Run main.py in a child process and SIGKILL it once `log` shows `step` finished training batches."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process' arithmetic
    proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while len(lines(log)) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {step}: {err[-3000:]}"


@pytest.fixture
def deterministic_torch():
    yield
    torch.use_deterministic_algorithms(False)  # the Trainer(deterministic=True) runs switch it on


def check_kill_and_resume(tmp_path: Path, case: tuple[str, list[str], list[str]]) -> None:
    config, keys, overrides = case
    base = ["-b", str(REPO / config), "-t", *overrides, *COMMON]
    whole, killed, resumed = tmp_path / "whole.txt", tmp_path / "killed.txt", tmp_path / "resumed.txt"
    assert main.main([*base, "-l", str(tmp_path / "a"), loss_log(whole, keys)]) == 0
    reference = lines(whole)
    assert len(reference) == STEPS
    kill_step = random.randint(3, STEPS - 3)                              # a random step, checkpoints at each one
    kill_at([*base, "-l", str(tmp_path / "b"), loss_log(killed, keys)], killed, kill_step)
    [logdir] = list((tmp_path / "b").iterdir())
    saved = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 1 <= saved < STEPS, f"killed at step {kill_step}, last.ckpt at step {saved}"
    before_kill = lines(killed)[:saved]  # the line of the step last.ckpt holds may not have been written yet
    assert len(before_kill) >= saved - 1 and before_kill == reference[:len(before_kill)]  # the processes agree
    assert main.main(["-r", str(logdir), "-t", f"lightning.callbacks.loss_log.params.path={resumed}"]) == 0
    after = lines(resumed)
    assert after == reference[saved:], (f"killed at step {kill_step}, resumed from step {saved}:\n"
                                        + "\n".join(f"{a}  |  {b}" for a, b in zip(reference[saved:], after)))
    [first] = list((tmp_path / "a").iterdir())  # the final states too: weights, EMA, optimizers, schedulers
    assert_same(torch.load(first / "checkpoints" / "last.ckpt", weights_only=True),
                torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True), "checkpoint")


def assert_same(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and numbers equal bit for bit (callbacks and loggers' entries aside)."""
    if isinstance(a, dict):
        keys = set(a) - {"callbacks", "loops", "hyper_parameters"} if where == "checkpoint" else set(a)
        assert keys <= set(b), f"{where}: missing {sorted(keys - set(b))}"
        for k in keys:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_autoencoder_with_discriminator_resumes_bit_exactly_after_kill_9(tmp_path, deterministic_torch):
    check_kill_and_resume(tmp_path, AUTOENCODER)


@pytest.mark.slow
def test_latent_diffusion_resumes_bit_exactly_after_kill_9(tmp_path, deterministic_torch):
    check_kill_and_resume(tmp_path, LDM)


# ---------------------------------------------------------------- the training order (map-style and shards)

def toy_config(tmp_path: Path, train: dict, num_workers: int = 0) -> str:
    """The main.py toy config with `train` as its training data; a checkpoint after every step."""
    import yaml

    from tests.test_main import TOY as BASE

    config = {**BASE, "data": {**BASE["data"], "params": {**BASE["data"]["params"], "train": train,
                                                          "num_workers": num_workers}}}
    config["lightning"] = {**BASE["lightning"], "trainer": {**BASE["lightning"]["trainer"], "max_steps": 10},
                           "modelcheckpoint": {"params": {"every_n_train_steps": 1, "save_top_k": -1,
                                                          "monitor": None}}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def check_order_resumes(tmp_path: Path, config: str, batches_per_epoch: int) -> None:
    """Resuming from a mid-epoch checkpoint, from the last batch of an epoch and from last.ckpt written at an
    epoch's end gives the batches the uninterrupted run trained on."""
    keys = ["train/loss"]
    whole = tmp_path / "whole.txt"
    assert main.main(["-b", config, "-t", "-l", str(tmp_path / "a"), loss_log(whole, keys)]) == 0
    reference = lines(whole)
    assert len(reference) == 10 and len(set(r.split()[2] for r in reference[:batches_per_epoch])) > 1
    [run] = list((tmp_path / "a").iterdir())
    for step in (3, batches_per_epoch):
        [ckpt] = (run / "checkpoints").glob(f"*step={step:09}.ckpt")
        out = tmp_path / f"from{step}.txt"
        assert main.main(["-r", str(ckpt), "-t", f"lightning.callbacks.loss_log.params.path={out}"]) == 0
        assert lines(out) == reference[step:], f"resumed from step {step}"
    epoch_end, out = tmp_path / "b", tmp_path / "from_epoch_end.txt"
    assert main.main(["-b", config, "-t", "-l", str(epoch_end), f"--max_steps={batches_per_epoch}",
                      loss_log(tmp_path / "first.txt", keys)]) == 0
    [run] = list(epoch_end.iterdir())
    assert main.main(["-r", str(run), "-t", "--max_steps=10", f"lightning.callbacks.loss_log.params.path={out}"]) == 0
    assert lines(tmp_path / "first.txt") + lines(out) == reference
    [ckpt] = (run / "checkpoints").glob(f"*step={batches_per_epoch + 2:09}.ckpt")  # the position it recorded
    state = torch.load(ckpt, weights_only=True)["callbacks"]["TrainingState"]
    assert (state["epoch"], state["batches"]) == (1, 2)


def test_map_style_order_resumes_mid_epoch_and_at_epoch_ends(tmp_path):
    train = {"target": "tests.toy_model.ToyImages", "params": {"length": 16}}  # 4 batches of 4 per epoch
    check_order_resumes(tmp_path, toy_config(tmp_path, train), 4)


def image_folder(root: Path, n: int = 24) -> Path:
    """`n` small random PNGs in two class folders, with sidecar captions."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from ldm.data.shard_writer import write_shards

    root = tmp_path_factory.mktemp("shards")
    write_shards(image_folder(root / "images"), root / "shards", shard_size=4, progress=lambda _: None)
    return root / "shards"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_order_resumes_mid_epoch_and_at_epoch_ends(tmp_path, shards, num_workers):
    train = {"target": "ldm.data.shards.ImageShards", "params": {"root": str(shards), "size": 8}}
    check_order_resumes(tmp_path, toy_config(tmp_path, train, num_workers), 6)  # 24 samples, 6 batches of 4
