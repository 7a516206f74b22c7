"""scripts/evaluate.py --task reconstruction: numbers beside the bicubic reference, protocol JSON, clear errors."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint_atomic
from ldm.eval.cli import main
from ldm.eval.reconstruction import bicubic_down_up, evaluate_reconstruction
from ldm.eval.metrics import psnr
from ldm.util import instantiate_from_config

DDCONFIG = dict(double_z=True, z_channels=3, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
CONFIG = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 3, "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}},
          "data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
                   "params": {"batch_size": 4, "validation": {"target": "ldm.data.photos.Photos",
                                                              "params": {"split": "validation", "size": 32,
                                                                         "length": 6}}}}}


class Identity(torch.nn.Module):
    def reconstruct(self, x):
        return x


def test_bicubic_arm_equals_the_formula_and_a_perfect_model_scores_inf():
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    out = evaluate_reconstruction(Identity(), [x[:3], x[3:]], torch.device("cpu"), bicubic_factor=4)
    assert out["autoencoder"]["psnr"] == float("inf") and out["autoencoder"]["ssim"] == pytest.approx(1.0)
    assert out["bicubic"]["psnr"] == pytest.approx(float(psnr(bicubic_down_up(x, 4), x).mean()), rel=1e-5)
    assert out["autoencoder"]["images"] == out["bicubic"]["images"] == 5


@pytest.fixture(scope="module")
def ae_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    torch.manual_seed(0)
    model = instantiate_from_config(CONFIG["model"])
    save_checkpoint_atomic({"state_dict": model.state_dict()}, root / "ae.ckpt")
    OmegaConf.save(OmegaConf.create(CONFIG), root / "ae.yaml")
    return root, model


def test_reconstruction_json_holds_numbers_and_protocol(ae_files, tmp_path, capsys):
    root, model = ae_files
    out = tmp_path / "m.json"
    assert main(["--config", str(root / "ae.yaml"), "--ckpt", str(root / "ae.ckpt"), "--task", "reconstruction",
                 "--out", str(out), "--lpips", "random", "--fid", "none", "--batch_size", "4"]) == 0
    record = json.loads(out.read_text())
    assert record["num_samples"] == 6 and record["image_size"] == 32 and record["data_split"] == "validation"
    assert record["sampler"] == "reconstruction" and record["checkpoint"].endswith("ae.ckpt")
    assert "f=4" in record["notes"] and record["feature_extractor"] == "none"
    metrics = record["metrics"]
    assert set(metrics) == {f"{arm}/{k}" for arm in ("autoencoder", "bicubic")
                            for k in ("psnr", "ssim", "lpips_random_trunk")}
    from ldm.data.photos import Photos
    x = torch.stack([Photos("validation", size=32, length=6)[i]["image"] for i in range(6)])
    assert metrics["autoencoder/psnr"] == pytest.approx(float(psnr(model.reconstruct(x).clamp(-1, 1), x).mean()),
                                                        abs=1e-3)
    assert metrics["bicubic/psnr"] > metrics["autoencoder/psnr"]          # an untrained autoencoder
    torch.manual_seed(123)                                                 # whatever ran before
    assert main(["--config", str(root / "ae.yaml"), "--ckpt", str(root / "ae.ckpt"), "--task", "reconstruction",
                 "--out", str(tmp_path / "again.json"), "--lpips", "random", "--fid", "none"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["metrics"]
    assert again == metrics                                                # the random trunk is seeded


def test_bad_input_is_a_clear_error(ae_files, tmp_path, capsys):
    root, _ = ae_files
    args = ["--task", "reconstruction", "--out", str(tmp_path / "m.json"), "--lpips", "none", "--fid", "none"]
    assert main(["--config", str(root / "ae.yaml"), "--ckpt", str(root / "missing.ckpt")] + args) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert main(["--config", str(root / "ae.yaml"), "--ckpt", str(root / "ae.ckpt"), "--split", "test"] + args) == 2
    assert "data.params.test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(root / "ae.yaml")] + args)
