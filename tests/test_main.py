"""main.py / ldm.cli / ldm.callbacks: flags, logdir layout, resume, config errors, callbacks, DDP."""
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

import main
from ldm import cli
from ldm.callbacks import AtomicCheckpointIO, ImageLogger, LastCheckpoint
from ldm.util import instantiate_from_config
from tests.toy_model import ToyAutoencoder, ToyImages

REPO = Path(__file__).resolve().parents[1]

TOY = {
    "model": {"base_learning_rate": 1.0e-4, "target": "tests.toy_model.ToyAutoencoder", "params": {"embed_dim": 2}},
    "data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
             "params": {"batch_size": 4,
                        "train": {"target": "tests.toy_model.ToyImages", "params": {"length": 12}},
                        "validation": {"target": "tests.toy_model.ToyImages", "params": {"length": 4, "seed": 1}}}},
    "lightning": {"trainer": {"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False,
                              "enable_model_summary": False, "log_every_n_steps": 1},
                  "callbacks": {"image_logger": {"params": {"batch_frequency": 2}}}},
}


@pytest.fixture
def toy_yaml(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY))
    return str(path)


def runs(logs: Path) -> list[Path]:
    return sorted(p for p in logs.iterdir() if p.is_dir())


def load(path) -> dict:
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- training runs (in-process)

def test_train_writes_the_logdir_layout(tmp_path, toy_yaml):
    logs = tmp_path / "logs"
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs), "model.params.embed_dim=4"]) == 0
    [logdir] = runs(logs)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_toy", logdir.name)
    now = logdir.name.split("_")[0]
    project = yaml.safe_load((logdir / "configs" / f"{now}-project.yaml").read_text())
    lightning = yaml.safe_load((logdir / "configs" / f"{now}-lightning.yaml").read_text())
    assert project["model"]["params"]["embed_dim"] == 4 and "lightning" not in project
    assert lightning["lightning"]["trainer"]["max_steps"] == 3
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and last["state_dict"]["encoder.weight"].shape[0] == 4
    # lr = 1 (accumulate) * 1 (device) * 1 (node) * 4 (batch) * 1e-4
    assert last["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(4e-4)
    assert (logdir / "checkpoints" / "epoch=000000-step=000000003.ckpt").is_file()  # top-k by model.monitor
    train_images = sorted(os.listdir(logdir / "images" / "train"))
    assert "inputs_gs-000001_e-000000_b-000000.png" in train_images
    assert "reconstructions_gs-000002_e-000000_b-000001.png" in train_images
    assert not [f for f in train_images if f.startswith(("captions", "latents"))]  # strings, 4-channel latents
    assert "inputs_gs-000003_e-000000_b-000000.png" in os.listdir(logdir / "images" / "val")
    assert list((logdir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(logdir.rglob("*.tmp"))


def test_resume_from_logdir_and_from_checkpoint_continues_counters(tmp_path, toy_yaml):
    logs = tmp_path / "logs"
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs)]) == 0
    [logdir] = runs(logs)
    step3 = logdir / "checkpoints" / "epoch=000000-step=000000003.ckpt"
    assert main.main(["-r", str(logdir), "-t", "lightning.trainer.max_steps=6"]) == 0
    assert runs(logs) == [logdir]  # same logdir, no new one
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert last["optimizer_states"][0]["state"][0]["step"] == 6  # Adam moments continued
    assert last["lr_schedulers"][0]["last_epoch"] >= 1
    # A checkpoint path: its logdir is two levels up; training restarts from step 3, not 6.
    assert main.main(["-r", str(step3), "-t", "--max_steps", "5"]) == 0
    assert runs(logs) == [logdir]
    assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_last_ckpt_follows_training_when_the_monitor_does_not_improve(tmp_path, toy_yaml):
    logs = tmp_path / "logs"  # mode=max on a falling loss: epoch 1 is not a top-1 checkpoint
    assert main.main(["-b", toy_yaml, "-t", "-l", str(logs), "--max_steps", "6",
                      "lightning.modelcheckpoint.params={mode: max, save_top_k: 1}"]) == 0
    [logdir] = runs(logs)
    assert sorted(os.listdir(logdir / "checkpoints")) == ["epoch=000000-step=000000003.ckpt", "last.ckpt"]
    assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_test_runs_with_a_test_section_unless_no_test_and_alone_without_train(tmp_path, toy_yaml):
    test = "data.params.test={target: tests.toy_model.ToyImages, params: {length: 4}}"
    csv = "lightning.logger.target=pytorch_lightning.loggers.CSVLogger"
    args = ["-b", toy_yaml, "-t", "-l", str(tmp_path / "logs"), "--max_steps", "1", test, csv]
    assert main.main(args + ["-n", "with_test"]) == 0
    assert main.main(args + ["-n", "no_test", "--no-test"]) == 0
    with_test, no_test = (next((tmp_path / "logs").glob(f"*_{n}")) for n in ("with_test", "no_test"))
    assert "test/loss" in (with_test / "csv" / "metrics.csv").read_text()
    assert "test/loss" not in (no_test / "csv" / "metrics.csv").read_text()
    assert main.main(["-r", str(no_test)]) == 0  # no -t: test the resumed checkpoint only
    assert "test/loss" in (no_test / "csv" / "metrics.csv").read_text()
    assert load(no_test / "checkpoints" / "last.ckpt")["global_step"] == 1


def test_keyboard_interrupt_saves_last_ckpt(tmp_path, toy_yaml):
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning exits after its graceful shutdown
            main.main(["-b", toy_yaml, "-t", "-l", str(tmp_path / "logs"), "model.params.interrupt_at=2"])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl+C after an interrupt
    [logdir] = runs(tmp_path / "logs")
    assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == 2


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_saves_checkpoint_at_next_batch_end(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    path = tmp_path / "signal.ckpt"
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LastCheckpoint(str(path), periodic=False)], plugins=[AtomicCheckpointIO()])
    loader = torch.utils.data.DataLoader(ToyImages(length=16), batch_size=4)
    trainer.fit(ToyAutoencoder(signal_at=1), loader)
    assert load(path)["global_step"] == 2  # the signal arrived during step 1's batch
    assert signal.getsignal(signal.SIGUSR1) == before  # handler removed after fit


TINY_KL = ["lightning.trainer.max_steps=2", "lightning.trainer.accelerator=cpu", "data.params.batch_size=2",
           "data.params.train.params={size: 32, length: 4}", "data.params.validation.params={size: 32, length: 2}",
           "model.params.ddconfig.resolution=32", "model.params.lossconfig.params.disc_start=1"]


@pytest.mark.slow
def test_kl_autoencoder_config_trains_and_resumes(tmp_path):
    logs = tmp_path / "logs"
    config = str(REPO / "configs" / "autoencoder" / "kl_f4_photos_tiny.yaml")
    assert main.main(["-b", config, "-t", "-l", str(logs), *TINY_KL]) == 0
    [logdir] = runs(logs)
    assert logdir.name.endswith("_kl_f4_photos_tiny")
    assert {"inputs_gs-000001_e-000000_b-000000.png", "reconstructions_gs-000001_e-000000_b-000000.png"} <= set(
        os.listdir(logdir / "images" / "train"))
    assert main.main(["-r", str(logdir), "-t", "--max_steps", "3"]) == 0
    last = load(logdir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and len(last["optimizer_states"]) == 2  # autoencoder + discriminator
    assert runs(logs) == [logdir]


# ---------------------------------------------------------------- errors

def test_unknown_config_key_is_one_error_naming_key_and_file(tmp_path, toy_yaml, capsys):
    code = main.main(["-b", toy_yaml, "-t", "-l", str(tmp_path / "logs"), "model.params.embed_dimm=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.params.embed_dimm" in err and "did you mean 'embed_dim'" in err and toy_yaml in err
    assert "Traceback" not in err


def test_unknown_trainer_key_and_missing_files_are_errors(tmp_path, toy_yaml, capsys):
    logs = str(tmp_path / "logs")
    assert main.main(["-b", toy_yaml, "-t", "-l", logs, "lightning.trainer.max_stepz=3"]) == 2
    assert "lightning.trainer.max_stepz (did you mean 'max_steps'?)" in capsys.readouterr().err
    assert main.main(["-b", str(tmp_path / "nope.yaml"), "-t", "-l", logs]) == 2
    assert "config file not found: " + str(tmp_path / "nope.yaml") in capsys.readouterr().err
    assert main.main(["-r", str(tmp_path / "no_run"), "-t"]) == 2
    assert "no such logdir or checkpoint file" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty_run")
    assert main.main(["-r", str(tmp_path / "empty_run"), "-t"]) == 2
    assert "last.ckpt" in capsys.readouterr().err
    assert main.main(["-b", toy_yaml, "-l", logs]) == 2  # neither -t nor a test section
    assert "nothing to run" in capsys.readouterr().err
    assert not os.path.exists(logs)


@pytest.mark.slow
def test_script_exits_2_with_one_message_on_a_config_typo(tmp_path, toy_yaml):
    proc = subprocess.run([sys.executable, "main.py", "-b", toy_yaml, "-t", "-l", str(tmp_path),
                           "model.params.embed_dimm=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "model.params.embed_dimm" in proc.stderr and toy_yaml in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- argument parsing (no training)

@pytest.mark.parametrize("text, expected", [
    ("0,1", {"accelerator": "gpu", "devices": [0, 1]}),
    ("0,1,", {"accelerator": "gpu", "devices": [0, 1]}),
    ("0,", {"accelerator": "gpu", "devices": [0]}),
    ("2", {"accelerator": "gpu", "devices": 2}),
    ("-1", {"accelerator": "gpu", "devices": -1}),
    ("0", {"accelerator": "cpu", "devices": "auto"}),
])
def test_gpus_flag(text, expected):
    assert cli.parse_args(["--gpus", text]).gpus == expected
    assert cli.trainer_config({}, cli.parse_args(["--gpus", text])) == expected


def test_bad_flags_are_argparse_errors():
    for argv in (["--gpus", "x"], ["--bogus"], ["stray_word"], ["-r", "logs/x", "-n", "name"],
                 ["--gpus", "1", "--devices", "2"], ["--scale_lr", "maybe"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(argv)
        assert exc.value.code == 2


def test_overrides_are_split_from_flags_and_not_swallowed_by_optional_values():
    opt = cli.parse_args(["-b", "a.yaml", "b.yaml", "-t", "model.params.embed_dim=4", "--no-test",
                          "lightning.trainer.max_steps=100", "data.params.batch_size=8"])
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train and opt.no_test
    assert opt.overrides == ["model.params.embed_dim=4", "lightning.trainer.max_steps=100", "data.params.batch_size=8"]


def test_dotlist_overrides_apply_last(tmp_path, toy_yaml):
    second = tmp_path / "second.yaml"
    second.write_text("data: {params: {batch_size: 2}}\nmodel: {params: {embed_dim: 5}}\n")
    config = cli.load_config([toy_yaml, str(second)], ["model.params.embed_dim=7"])
    assert config.data.params.batch_size == 2 and config.model.params.embed_dim == 7


def test_trainer_flags_override_config_and_translate_gpus():
    lightning = {"trainer": {"max_steps": 10, "gpus": "0,", "precision": 32}}
    config = cli.trainer_config(lightning, cli.parse_args(["--max_steps", "20", "--num_nodes", "2",
                                                           "--precision", "16"]))
    assert config == {"max_steps": 20, "accelerator": "gpu", "devices": [0], "precision": 16, "num_nodes": 2}
    compvis = OmegaConf.create({"trainer": {"accelerator": "ddp", "gpus": [0, 1]}})  # a CompVis lightning.yaml
    assert cli.trainer_config(compvis, cli.parse_args([])) == {"strategy": "ddp", "accelerator": "gpu",
                                                               "devices": [0, 1]}


def test_scale_lr_rule_includes_num_nodes():
    lr, rule = cli.learning_rate(4.5e-6, batch_size=8, accumulate=2, n_devices=4, num_nodes=3, scale=True)
    assert lr == pytest.approx(2 * 4 * 3 * 8 * 4.5e-6)
    assert "3 (num_nodes)" in rule and "4 (devices)" in rule and "8 (batch_size)" in rule
    assert cli.learning_rate(4.5e-6, 8, 2, 4, 3, scale=False)[0] == 4.5e-6
    assert cli.parse_args([]).scale_lr is True
    assert cli.parse_args(["--scale_lr", "false"]).scale_lr is False
    assert cli.parse_args(["--no-scale_lr"]).scale_lr is False


def test_run_paths_name_postfix_project_debug(tmp_path):
    now = "2024-01-02T03-04-05"
    paths = cli.run_paths(cli.parse_args(["-b", "cfg/kl_f4.yaml", "-l", "L", "-f", "_v2"]), now)
    assert paths.logdir == os.path.join("L", f"{now}_kl_f4_v2") and paths.resume_ckpt is None
    paths = cli.run_paths(cli.parse_args(["-b", "x.yaml", "-n", "mine", "-p", "proj", "-d"]), now)
    assert paths.logdir == os.path.join("logs", "proj", "debug_runs", f"{now}_mine")


def test_resume_prepends_saved_configs_sorted(tmp_path):
    run = tmp_path / "2024-01-01T00-00-00_x"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in ("b-project.yaml", "a-lightning.yaml"):
        (run / "configs" / name).write_text("{}")
    ckpt = run / "checkpoints" / "epoch=1.ckpt"
    ckpt.write_bytes(b"")
    paths = cli.run_paths(cli.parse_args(["-r", str(ckpt), "-b", "extra.yaml"]), "now")
    assert paths.logdir == str(run) and paths.resume_ckpt == str(ckpt)
    assert paths.base == [str(run / "configs" / "a-lightning.yaml"), str(run / "configs" / "b-project.yaml"),
                          "extra.yaml"]


def test_timestamp_is_shared_with_workers_and_not_leaked(monkeypatch):
    monkeypatch.delenv(cli.TIMESTAMP_ENV, raising=False)
    with cli.shared_timestamp() as now:
        assert os.environ[cli.TIMESTAMP_ENV] == now  # what a DDP worker started now inherits
    assert cli.TIMESTAMP_ENV not in os.environ
    monkeypatch.setenv(cli.TIMESTAMP_ENV, "2020-01-01T00-00-00")  # in a worker
    with cli.shared_timestamp() as now:
        assert now == "2020-01-01T00-00-00"
    assert os.environ[cli.TIMESTAMP_ENV] == "2020-01-01T00-00-00"


def test_compvis_targets_main_x_resolve():
    logger = instantiate_from_config({"target": "main.ImageLogger", "params": {"batch_frequency": 5}})
    assert isinstance(logger, ImageLogger)


# ---------------------------------------------------------------- callbacks and checkpoint IO

class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(3), "bad": Unpicklable()}, path)
    assert os.listdir(path.parent) == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous checkpoint is intact


def test_checkpoint_io_loads_weights_only_by_default(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(Exception, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert AtomicCheckpointIO().load_checkpoint(path, weights_only=False)["obj"].a == 1


class FrozenPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(1, 1).eval()
        self.trained_in_eval = False

    def log_images(self, batch, split):
        self.trained_in_eval = self.training or torch.is_grad_enabled()
        return {"grey": torch.linspace(-3, 3, 2 * 16).view(2, 1, 4, 4), "text": ["a", "b"]}


def test_image_logger_schedule_modes_and_grids(tmp_path):
    assert ImageLogger(8).log_steps == {1, 2, 4, 8}
    assert ImageLogger(8, increase_log_steps=False).log_steps == set()
    module = FrozenPart().train()
    module.frozen.eval()
    trainer = types.SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path), global_step=7,
                                    current_epoch=1, loggers=[])
    ImageLogger(8, clamp=False).log_images(trainer, module, batch=None, batch_idx=3, split="train")
    assert not module.trained_in_eval  # eval mode, no grad
    assert module.training and not module.frozen.training  # each module's mode restored
    from PIL import Image
    grid = Image.open(tmp_path / "images" / "train" / "grey_gs-000007_e-000001_b-000003.png")
    assert grid.getextrema()[0] == (0, 255)  # clamp=False: min-max rescaled
    assert os.listdir(tmp_path / "images" / "train") == ["grey_gs-000007_e-000001_b-000003.png"]


# ---------------------------------------------------------------- DDP (2 CPU processes, gloo)

@pytest.mark.slow
def test_ddp_on_cpu_leaves_one_logdir(tmp_path, toy_yaml):
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "main.py", "-b", toy_yaml, "-t", "-l", str(logs), "--accelerator", "cpu",
                           "--devices", "2", "--strategy", "ddp"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != cli.TIMESTAMP_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [logdir] = runs(logs)
    out = proc.stdout + proc.stderr
    assert "2 (devices)" in out
    assert f"[rank 0] logdir {logdir}" in out and f"[rank 1] logdir {logdir}" in out  # one name on every rank
    assert load(logdir / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert len(list((logdir / "configs").glob("*.yaml"))) == 2
