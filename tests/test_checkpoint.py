"""Checkpoint files (safe unpickling, safetensors, atomic saves), the key report, the loading rules on tiny models."""
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from ldm import cli
from ldm.checkpoint import (CheckpointMismatchError, InertObject, UnsafeCheckpointError, compare_state_dict,
                            group_keys, read_checkpoint, read_state_dict, save_checkpoint_atomic, save_safetensors,
                            unsafe_pickle_allowed)
from ldm.loading import load_weights


def random_sd(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.diffusion_model.0.weight": torch.randn(4, 3, generator=g),
            "model.diffusion_model.0.bias": torch.randn(4, generator=g),
            "betas": torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64).float()}


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- reading -----------------------------------------------------------------------------------------------------
def test_ckpt_dict_bare_pt_and_safetensors_read_to_identical_weights(tmp_path):
    sd = random_sd()
    save_checkpoint_atomic({"state_dict": sd, "global_step": 3, "epoch": 1}, tmp_path / "a.ckpt")
    save_checkpoint_atomic(sd, tmp_path / "b.pt")
    save_safetensors(sd, tmp_path / "c.safetensors")
    for name in ("a.ckpt", "b.pt", "c.safetensors"):
        loaded = read_state_dict(tmp_path / name)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        read_state_dict(tmp_path / "nowhere.ckpt")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_executing_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": random_sd(), "extra": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "evil.ckpt" in message and "posix.system" in message
    assert "allow_pickle=True" in message and "--unsafe-pickle" in message and "code" in message
    assert not marker.exists()


def test_allow_pickle_is_the_explicit_opt_in_and_does_run_the_payload(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": random_sd(), "extra": Payload(marker)}, path)
    sd = read_state_dict(path, allow_pickle=True)                    # the refusal above guards a real payload
    assert marker.exists() and torch.equal(sd["betas"], random_sd()["betas"])


def test_main_py_unsafe_pickle_is_a_per_command_opt_in_for_nested_reads(tmp_path):
    """main.py --unsafe-pickle: configs' ckpt_path files are read deep inside model constructors."""
    assert cli.parse_args(["-b", "x.yaml", "--unsafe-pickle"]).unsafe_pickle
    assert not cli.parse_args(["-b", "x.yaml"]).unsafe_pickle
    marker = tmp_path / "payload_ran"
    torch.save({"state_dict": random_sd(), "extra": Payload(marker)}, tmp_path / "evil.ckpt")
    with unsafe_pickle_allowed(False), pytest.raises(UnsafeCheckpointError):
        read_state_dict(tmp_path / "evil.ckpt")
    with unsafe_pickle_allowed():
        read_state_dict(tmp_path / "evil.ckpt")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError):                        # the opt-in ends with its block
        read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_lightning1_metadata_loads_without_running_its_code(tmp_path):
    """SD-era files pickle ModelCheckpoint objects / class keys and numpy scalars beside the weights."""
    callback = ModelCheckpoint.__new__(ModelCheckpoint)              # state as Lightning 1.x pickled it
    callback.__dict__.update(monitor="val/loss", best_model_score=torch.tensor(0.25), best_model_path="e.ckpt")
    path = tmp_path / "sd-style.ckpt"
    torch.save({"state_dict": random_sd(), "global_step": 470000, "callback": callback,
                "callbacks": {ModelCheckpoint: {"best": np.float64(0.5), "dtype": np.dtype("float32")}}}, path)
    obj = read_checkpoint(path)
    assert isinstance(obj["callback"], InertObject) and obj["callback"].state["monitor"] == "val/loss"
    assert obj["callbacks"] == {InertObject: {"best": 0.5, "dtype": np.dtype("float32")}}
    assert torch.equal(read_state_dict(path)["betas"], random_sd()["betas"])


def test_unreadable_and_non_state_dict_files_are_named(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match="junk.ckpt.*not a readable torch checkpoint") as info:
        read_state_dict(tmp_path / "junk.ckpt")
    assert not isinstance(info.value, UnsafeCheckpointError)
    torch.save({"state_dict": {"a": torch.ones(1), "note": "text"}}, tmp_path / "mixed.ckpt")
    with pytest.raises(ValueError, match=r"mixed.ckpt.*\['note'\] are not tensors"):
        read_state_dict(tmp_path / "mixed.ckpt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt.*holds a list"):
        read_state_dict(tmp_path / "list.pt")


# ---- saving ------------------------------------------------------------------------------------------------------
def test_atomic_save_replaces_whole_file_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    save_checkpoint_atomic({"state_dict": random_sd(0)}, path)
    save_checkpoint_atomic({"state_dict": random_sd(1)}, path)
    assert torch.equal(read_state_dict(path)["model.diffusion_model.0.bias"],
                       random_sd(1)["model.diffusion_model.0.bias"])
    with pytest.raises(Exception):
        save_checkpoint_atomic({"state_dict": random_sd(2), "bad": lambda: 0}, path)  # lambdas do not pickle
    assert torch.equal(read_state_dict(path)["model.diffusion_model.0.bias"],
                       random_sd(1)["model.diffusion_model.0.bias"])
    assert os.listdir(path.parent) == ["last.ckpt"]                  # no temporary file left behind


def test_safetensors_keeps_every_key_of_shared_tensors_and_metadata(tmp_path):
    w = torch.randn(6, 4)
    sd = {"first_stage_model.w": w, "cond_stage_model.w": w, "half": w[:3], "t": w.t()}
    save_safetensors(sd, tmp_path / "s.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "s.safetensors")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
    assert read_state_dict(tmp_path / "s.safetensors")["t"].shape == (4, 6)


# ---- the report --------------------------------------------------------------------------------------------------
def test_keys_are_grouped_by_prefix_with_counts():
    keys = [f"first_stage_model.decoder.up.{i}.block.{j}.conv1.{p}" for i in range(2) for j in range(3)
            for p in ("weight", "bias")]
    keys += ["first_stage_model.quant_conv.weight", "first_stage_model.quant_conv.bias", "betas"]
    assert group_keys(keys, "missing") == [
        "first_stage_model.decoder.up.*: 12 missing (e.g. first_stage_model.decoder.up.0.block.0.conv1.weight)",
        "first_stage_model.quant_conv.*: 2 missing (e.g. first_stage_model.quant_conv.weight)", "betas"]
    many = group_keys([f"m{i}.w" for i in range(30)], "missing", limit=5)
    assert len(many) == 6 and many[-1] == "... and 25 more group(s)"


def test_report_lists_missing_unexpected_and_both_shapes_with_a_prefix_hint():
    expected = {"model.diffusion_model.out.weight": (4, 8), "model.diffusion_model.out.bias": (4,),
                "betas": (10,)}
    found = {"diffusion_model.out.weight": torch.zeros(4, 8), "diffusion_model.out.bias": torch.zeros(4),
             "betas": torch.zeros(12)}
    report = compare_state_dict(expected, found)
    assert not report.ok and report.mismatched == [("betas", (12,), (10,))]
    text = report.describe("x.ckpt", "DDPM")
    assert "checkpoint 'x.ckpt' does not fit DDPM" in text
    assert "2 missing key(s)" in text and "model.diffusion_model.out.*: 2 missing" in text
    assert "2 unexpected key(s)" in text and "betas: file (12,), model (10,)" in text
    assert "lack the prefix 'model.'" in text and "strict=False" in text


# ---- loading rules -----------------------------------------------------------------------------------------------
class TinyLDM(nn.Module):
    """The prefixes of a latent diffusion model: U-Net under model.diffusion_model, a first stage, buffers."""

    def __init__(self, with_loss=False, first_stage_as_cond=False):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        self.first_stage_model = nn.Conv2d(2, 2, 1)
        if with_loss:
            self.first_stage_model.loss = nn.Linear(1, 1)
        if first_stage_as_cond:
            self.cond_stage_model = self.first_stage_model
        self.register_buffer("betas", torch.zeros(5))


def tiny_file(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def ema_of(sd, seed=1):
    g = torch.Generator().manual_seed(seed)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): torch.randn(v.shape, generator=g)
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    return ema | {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234)}


@pytest.mark.parametrize("use_ema", [True, False])
def test_ema_copies_replace_the_unet_or_are_dropped(use_ema, caplog):
    model = TinyLDM()
    sd = tiny_file(model)
    ema = ema_of(sd)
    with caplog.at_level(logging.INFO, logger="ldm.loading"):
        report = load_weights(model, sd | ema, use_ema=use_ema)
    assert report.ok
    w = model.model.diffusion_model[1].weight
    assert torch.equal(w, ema["model_ema.diffusion_model1weight"] if use_ema else sd["model.diffusion_model.1.weight"])
    assert torch.equal(model.first_stage_model.weight, sd["first_stage_model.weight"])
    expected_note = "4 weights under model.* replaced by their EMA copies" if use_ema else "6 model_ema.* keys dropped"
    assert expected_note in caplog.text


def test_file_without_ema_loads_as_stored_and_says_so():
    model = TinyLDM()
    sd = tiny_file(model)
    report = load_weights(model, sd, use_ema=True)
    assert report.ok and any("EMA-only" in n for n in report.notes)
    assert torch.equal(model.model.diffusion_model[0].bias, sd["model.diffusion_model.0.bias"])


def test_ema_copy_without_a_matching_weight_is_unexpected():
    model = TinyLDM()
    sd = tiny_file(model) | ema_of(tiny_file(model)) | {"model_ema.diffusion_model9weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match="model_ema.diffusion_model9weight"):
        load_weights(model, sd, use_ema=True)


def test_training_loss_keys_are_dropped_only_without_a_loss_module():
    sd = tiny_file(TinyLDM()) | {"first_stage_model.loss.weight": torch.ones(1, 1),
                                 "first_stage_model.loss.bias": torch.ones(1)}
    report = load_weights(TinyLDM(), sd)
    assert report.ok and any("2 first_stage_model.loss.* key(s) dropped" in n for n in report.notes)
    with_loss = TinyLDM(with_loss=True)
    assert load_weights(with_loss, sd).ok                             # matched and loaded like any other key
    assert with_loss.first_stage_model.loss.weight.item() == 1.0


def test_module_under_two_names_takes_the_files_single_copy():
    model = TinyLDM(first_stage_as_cond=True)
    sd = {k: v for k, v in tiny_file(model).items() if not k.startswith("cond_stage_model.")}
    report = load_weights(model, sd)
    assert report.ok and any("cond_stage_model.* key(s) taken from the file's first_stage_model.*" in n
                             for n in report.notes)
    assert torch.equal(model.cond_stage_model.weight, sd["first_stage_model.weight"])


def test_strict_raises_and_non_strict_loads_what_fits(caplog):
    model = TinyLDM()
    sd = tiny_file(model)
    sd["model.diffusion_model.1.weight"] = torch.zeros(3, 3)
    del sd["betas"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(model, sd, source="bad.ckpt")
    assert info.value.report.missing == ["betas"]
    assert "model.diffusion_model.1.weight: file (3, 3), model (2, 4)" in str(info.value)
    fresh = TinyLDM()
    with caplog.at_level(logging.WARNING, logger="ldm.loading"):
        report = load_weights(fresh, sd, strict=False, source="bad.ckpt")
    assert not report.ok and "does not fit TinyLDM" in caplog.text
    assert torch.equal(fresh.model.diffusion_model[0].weight, sd["model.diffusion_model.0.weight"])
