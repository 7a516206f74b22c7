"""scripts/sample.py on tiny models of every condition kind (random weights, in a fake run directory), and every
full-size config of configs/diffusion built on the meta device and run through one training loss.

The tiny configs themselves train through main.py in tests/test_latent_diffusion.py; here they only give the
models that the sampling script loads.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from ldm.loading import build_model
from ldm.util import instantiate_from_config
from tests.test_compat import parameters_on_meta
from tests.test_ddpm import randomize_zero_layers, single_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[1]
DIFFUSION = REPO / "configs" / "diffusion"
STAMP = "2024-01-02T03-04-05"


def _load_script():
    spec = importlib.util.spec_from_file_location("sample_script", REPO / "scripts" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = _load_script()


def make_run(root: Path, config_name: str, seed: int = 0, **params) -> Path:
    """A run directory as main.py leaves it (configs/<now>-project.yaml, checkpoints/last.ckpt) holding a tiny
    model with random weights; its first-stage ckpt_path names a file that is gone, as after moving a run."""
    config = OmegaConf.load(DIFFUSION / config_name)
    config.pop("lightning")
    config.model.params.update(params)
    model_config = OmegaConf.to_container(config.model, resolve=True)
    if "first_stage_config" in config.model.params:
        config.model.params.first_stage_config.params.ckpt_path = str(root / "gone" / "first_stage.ckpt")
        model_config["params"]["first_stage_config"]["params"]["ckpt_path"] = None
        model_config["params"]["allow_random_first_stage"] = True
    torch.manual_seed(seed)
    model = randomize_zero_layers(instantiate_from_config(model_config))
    run = root / f"{STAMP}_{Path(config_name).stem}"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(config, run / "configs" / f"{STAMP}-project.yaml")
    torch.save({"state_dict": model.state_dict(), "global_step": 3}, run / "checkpoints" / "last.ckpt")
    return run


def run_script(*argv) -> int:
    return sample.main([str(a) for a in argv])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def outputs(outdir: Path) -> tuple[list[str], dict]:
    return sorted(p.name for p in outdir.glob("*.png")), json.loads((outdir / "samples.json").read_text())


def grid_side(k: int, side: int) -> int:
    return k * (side + 2) + 2  # make_grid, padding 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs built on first use, shared by the tests of this module."""
    built = {}

    def get(config_name: str, **params) -> Path:
        key = (config_name, tuple(sorted(params.items())))
        if key not in built:
            built[key] = make_run(tmp_path_factory.mktemp("runs"), config_name, **params)
        return built[key]
    return get


# ---- one test per condition kind -----------------------------------------------------------------------------------
def test_text_model_two_prompts_with_guidance(runs, tmp_path):
    run = runs("ldm_shapes_text_tiny.yaml")
    args = ["--run", run, "--prompt", "a red circle", "--prompt", "a blue star", "--n", 2, "--steps", 3,
            "--batch_size", 3]
    assert run_script(*args, "--scale", 3, "--outdir", tmp_path / "cfg") == 0
    files, meta = outputs(tmp_path / "cfg")
    assert files == ["00000_a-red-circle.png", "00001_a-red-circle.png", "00002_a-blue-star.png",
                     "00003_a-blue-star.png", "grid.png"]
    assert Image.open(tmp_path / "cfg" / "grid.png").size == (grid_side(2, 32), grid_side(2, 32))
    assert Image.open(tmp_path / "cfg" / "00000_a-red-circle.png").size == (32, 32)
    images = meta["images"]
    assert [e["condition"] for e in images] == [{"prompt": "a red circle"}] * 2 + [{"prompt": "a blue star"}] * 2
    assert [e["seed"] for e in images] == [0, 1, 2, 3] and [e["row"] for e in images] == [0, 0, 1, 1]
    assert all(e["sampler"] == {"sampler": "ddim", "schedule": "uniform", "steps": 3, "eta": 0.0, "guidance_scale": 3.0}
               for e in images)
    assert meta["settings"]["checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert run_script(*args, "--outdir", tmp_path / "plain") == 0
    assert not np.array_equal(pixels(tmp_path / "cfg" / files[0]), pixels(tmp_path / "plain" / files[0]))
    assert not np.array_equal(pixels(tmp_path / "cfg" / files[0]), pixels(tmp_path / "cfg" / files[2]))


def test_class_model_takes_names_and_is_deterministic_per_sample_seed(runs, tmp_path):
    run = runs("ldm_shapes_class_tiny.yaml")
    args = ["--run", run, "--class", "circle", "3", "--n", 2, "--steps", 4, "--seed", 7, "--scale", 2]
    assert run_script(*args, "--outdir", tmp_path / "a") == 0
    assert run_script(*args, "--outdir", tmp_path / "b", "--batch_size", 1) == 0
    assert run_script(*args, "--outdir", tmp_path / "c", "--seed", 8) == 0
    files, meta = outputs(tmp_path / "a")
    assert files == ["00000_circle.png", "00001_circle.png", "00002_star.png", "00003_star.png", "grid.png"]
    assert [e["condition"] for e in meta["images"]] == [{"class": 0, "class_name": "circle"}] * 2 + \
        [{"class": 3, "class_name": "star"}] * 2
    for name in files:  # another batch size: the same pictures (up to rounding); another seed: new ones
        assert np.abs(pixels(tmp_path / "a" / name) - pixels(tmp_path / "b" / name)).max() <= 1
        assert not np.array_equal(pixels(tmp_path / "a" / name), pixels(tmp_path / "c" / name))
    # sample 3 alone from its recorded seed
    assert meta["images"][3]["seed"] == 10
    assert run_script("--run", run, "--class", 3, "--n", 1, "--steps", 4, "--seed", 10, "--scale", 2,
                      "--outdir", tmp_path / "d") == 0
    assert np.abs(pixels(tmp_path / "a" / "00003_star.png") - pixels(tmp_path / "d" / "00000_star.png")).max() <= 1


def test_layout_model_takes_json_strings_and_files(runs, tmp_path):
    run = runs("ldm_shapes_layout_tiny.yaml")
    (tmp_path / "layout.json").write_text("[[1, 0.2, 0.2, 0.8, 0.8]]")
    assert run_script("--run", run, "--layout", '[["circle", 0.1, 0.1, 0.5, 0.5], [3, 0.55, 0.5, 0.95, 0.9]]',
                      "--layout", tmp_path / "layout.json", "--layout", "[]", "--n", 1, "--steps", 2,
                      "--scale", 2, "--outdir", tmp_path / "out") == 0
    files, meta = outputs(tmp_path / "out")
    assert files == ["00000_circle-star.png", "00001_square.png", "00002_empty-layout.png", "grid.png"]
    assert meta["images"][0]["condition"] == {"layout": [
        {"class": 0, "class_name": "circle", "box": [0.1, 0.1, 0.5, 0.5]},
        {"class": 3, "class_name": "star", "box": [0.55, 0.5, 0.95, 0.9]}]}
    assert Image.open(tmp_path / "out" / "grid.png").size == (grid_side(1, 32), grid_side(3, 32))


def test_super_resolution_model_upscales_the_image_four_times(runs, tmp_path):
    run = runs("ldm_photos_sr_tiny.yaml")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    assert run_script("--run", run, "--image", tmp_path / "lr.png", "--n", 2, "--steps", 2,
                      "--outdir", tmp_path / "out") == 0
    files, meta = outputs(tmp_path / "out")
    assert files == ["00000_lr.png", "00001_lr.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "00000_lr.png").size == (96, 64)
    assert meta["images"][1]["condition"] == {"image": str(tmp_path / "lr.png")}


def test_stablesr_model_upscales_the_lr_picture_from_its_noised_latent(runs, tmp_path):
    run = runs("stablesr_photos_tiny.yaml", ckpt_path=None)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    assert run_script("--run", run, "--image", tmp_path / "lr.png", "--n", 2, "--steps", 3, "--eta", 1,
                      "--outdir", tmp_path / "out") == 0
    files, meta = outputs(tmp_path / "out")
    assert files == ["00000_lr.png", "00001_lr.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "00000_lr.png").size == (96, 64)
    assert meta["images"][0]["condition"] == {"image": str(tmp_path / "lr.png")}
    assert not np.array_equal(pixels(tmp_path / "out" / files[0]), pixels(tmp_path / "out" / files[1]))
    Image.fromarray(np.zeros((10, 24, 3), np.uint8)).save(tmp_path / "odd.png")
    assert run_script("--run", run, "--image", tmp_path / "odd.png", "--outdir", tmp_path / "x") == 2


def test_inpainting_model_keeps_the_known_pixels_and_fills_the_mask(runs, tmp_path):
    run = runs("ldm_photos_inpaint_tiny.yaml")
    picture = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    Image.fromarray(picture).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert run_script("--run", run, "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png", "--n", 1,
                      "--steps", 2, "--outdir", tmp_path / "out") == 0
    files, meta = outputs(tmp_path / "out")
    assert files == ["00000_photo.png", "grid.png"]
    out = pixels(tmp_path / "out" / "00000_photo.png")
    hole = mask > 0
    assert np.array_equal(out[~hole], picture[~hole])
    assert np.abs(out[hole] - picture[hole]).mean() > 10
    assert meta["images"][0]["condition"] == {"image": str(tmp_path / "photo.png"), "mask": str(tmp_path / "mask.png")}


def test_semantic_model_reads_a_label_map(runs, tmp_path):
    run = runs("ldm_shapes_semantic_tiny.yaml")
    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 6:22], labels[18:30, 16:30] = 1, 4
    Image.fromarray(labels).save(tmp_path / "map.png")
    assert run_script("--run", run, "--image", tmp_path / "map.png", "--n", 1, "--steps", 2,
                      "--outdir", tmp_path / "out") == 0
    assert Image.open(tmp_path / "out" / "00000_map.png").size == (32, 32)


def test_unconditional_ddpm_from_config_and_checkpoint(runs, tmp_path):
    run = runs("ddpm_shapes_tiny.yaml", timesteps=10)
    config, ckpt = run / "configs" / f"{STAMP}-project.yaml", run / "checkpoints" / "last.ckpt"
    assert run_script("--config", config, "--ckpt", ckpt, "--sampler", "ddpm", "--n", 4, "--device", "cpu",
                      "--outdir", tmp_path / "out") == 0
    files, meta = outputs(tmp_path / "out")
    assert files == [f"0000{i}_sample.png" for i in range(4)] + ["grid.png"]
    assert Image.open(tmp_path / "out" / "grid.png").size == (grid_side(2, 32), grid_side(2, 32))  # a 2 x 2 square
    assert meta["settings"]["steps"] == 10 and meta["settings"]["config"] == [str(config)]
    assert all(e["condition"] == {} for e in meta["images"])


# ---- errors --------------------------------------------------------------------------------------------------------
def test_inputs_that_do_not_fit_the_model_are_one_clear_error(runs, tmp_path, capsys):
    ddpm, text = runs("ddpm_shapes_tiny.yaml", timesteps=10), runs("ldm_shapes_text_tiny.yaml")
    cases = [
        (["--run", ddpm, "--prompt", "a red circle"], "--prompt/--prompts does not fit this model: it is an "
                                                      "unconditional model (DDPM"),
        (["--run", ddpm, "--scale", 3], "classifier-free guidance needs a conditional model"),
        (["--run", text], "--prompt/--prompts missing: the model is a text-conditional model"),
        (["--run", text, "--prompt", "x", "--class", "1"], "--class does not fit this model"),
        (["--run", text, "--prompt", "a red circle", "--prompt", "a red circle" + " and a blue square" * 8],
         "--prompt: prompt 'a red circle and a blue square and a blue square and a blue square and a blue...' is 37 "
         "tokens long; the text encoder (FrozenTextEmbedder) reads at most 32 (special tokens included) and would cut "
         "the rest: shorten it"),
        (["--run", runs("ldm_shapes_class_tiny.yaml"), "--prompt", "x"],
         "--prompt/--prompts does not fit this model: it is a class-conditional model"),
        (["--run", runs("ldm_photos_inpaint_tiny.yaml"), "--image", "photo.png"], "--mask missing"),
        (["--run", runs("ldm_shapes_class_tiny.yaml"), "--class", "hexagon"],
         "--class 'hexagon': unknown class; give one of ['circle', 'square', 'triangle', 'star']"),
        (["--run", runs("ldm_shapes_layout_tiny.yaml"), "--layout", "[[0, 0.5, 0.5, 0.2, 0.9]]"],
         "needs 0 <= x0 <= x1 <= 1"),
        (["--config", ddpm / "configs" / f"{STAMP}-project.yaml", "--ckpt", tmp_path / "nowhere.ckpt"],
         f"checkpoint file '{tmp_path / 'nowhere.ckpt'}' does not exist"),
        (["--run", tmp_path], f"--run '{tmp_path}': no configs/*-project.yaml"),
    ]
    for argv, message in cases:
        assert run_script(*argv, "--outdir", tmp_path / "out") == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_image_sizes_the_model_cannot_take_are_named(runs, tmp_path, capsys):
    Image.new("RGB", (18, 16)).save(tmp_path / "lr.png")
    assert run_script("--run", runs("ldm_photos_sr_tiny.yaml"), "--image", tmp_path / "lr.png") == 2
    assert "gives 18x16 latents; the U-Net needs multiples of 4" in capsys.readouterr().err
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    inpaint = runs("ldm_photos_inpaint_tiny.yaml")
    assert run_script("--run", inpaint, "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png") == 2
    assert "is 32x32 px, --image" in capsys.readouterr().err


def test_command_line_mistakes_exit_with_usage():
    for argv in (["--n", "2"], ["--config", "c.yaml"], ["--run", "r", "--sampler", "plms", "--eta", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            run_script(*argv)
        assert exc.value.code == 2


# ---- the full-size configs -----------------------------------------------------------------------------------------
FULL = sorted(p for p in DIFFUSION.glob("*.yaml") if not p.stem.endswith("_tiny"))
AUTOENCODERS = [OmegaConf.to_container(OmegaConf.load(p).model.params)
                for p in (REPO / "configs" / "autoencoder").glob("*.yaml")]
PUBLISHED_UNET_PARAMS = {"ldm_uncond_256": 274e6, "ldm_class_imagenet": 400e6}  # LDM paper: CelebA-HQ / ImageNet LDM-4


def test_every_full_size_config_is_present():
    assert {p.stem for p in FULL} >= {"ldm_uncond_256", "ldm_class_imagenet", "ldm_txt2img", "ldm_layout", "ldm_sr",
                                      "ldm_inpaint"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two class folders of one picture each, with captions and boxes in metadata.jsonl."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for i, name in enumerate(("cats", "dogs")):
        (root / name).mkdir()
        Image.fromarray(rng.integers(0, 256, (280, 300, 3), dtype=np.uint8)).save(root / name / "a.png")
        lines.append(json.dumps({"file_name": f"{name}/a.png", "text": f"a photo of {name}",
                                 "boxes": [[i, 0.1, 0.2, 0.6, 0.7], [2, 0.5, 0.5, 0.9, 0.95]]}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root


def training_batch(config, root: Path) -> dict:
    """Two samples of the config's training data, its image-folder root set by the one override."""
    key = "data.params.train.params." + ("dataset.params." if "dataset" in config.data.params.train.params else "")
    config = OmegaConf.merge(config, OmegaConf.from_dotlist([f"{key}root={root}"]))
    dataset = instantiate_from_config(OmegaConf.to_container(config.data.params.train, resolve=True))
    return default_collate([dataset[0], dataset[1]])


@pytest.mark.parametrize("path", FULL, ids=[p.stem for p in FULL])
def test_full_size_config_builds_and_takes_its_data_through_the_loss_on_meta(path, image_folder):
    config = OmegaConf.load(path)
    first = OmegaConf.to_container(config.model.params.first_stage_config.params)
    assert any(a["ddconfig"] == first["ddconfig"] and a["embed_dim"] == first["embed_dim"]
               and a.get("n_embed") == first.get("n_embed") for a in AUTOENCODERS), "first stage of no config of ours"
    batch = training_batch(config, image_folder)
    with parameters_on_meta():
        model = build_model(path).to("meta")
    unet_params = sum(p.numel() for p in model.model.parameters())
    if path.stem in PUBLISHED_UNET_PARAMS:
        assert unet_params == pytest.approx(PUBLISHED_UNET_PARAMS[path.stem], rel=0.01)
    z = model.get_first_stage_encoding(model.get_image(batch))                        # (2, C, h, w) on meta
    assert z.shape == (2, model.channels, model.image_size, model.image_size)
    cond = {}
    if callable(getattr(model, "lr_condition", None)):  # StableSR: the LR latent (as_condition adds the empty prompt)
        cond["c_lr"] = model.lr_latent(model.get_image(batch, model.lr_key), tuple(batch["image"].shape[-2:]))
    elif model.cond_stage_model is not None:  # the conditioner with real weights on the real data, output to meta
        conditioner = instantiate_from_config(OmegaConf.to_container(config.model.params.cond_stage_config))
        with torch.no_grad():
            cond[model.cond_stage_keyword] = conditioner(batch[model.cond_stage_key]).to("meta")
    if model.masked_image_key is not None:
        cond["c_concat"] = model.inpainting_condition(batch)
    loss, _ = model.p_losses(z, model.as_condition(cond))
    assert loss.shape == () and loss.device.type == "meta"
