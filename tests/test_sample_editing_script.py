"""scripts/sample.py with the sigma samplers and editing flags (--schedule, --init-image, --strength, --mask for any
model) on tiny random-weight runs; the condition flags are tested in tests/test_sample_script.py."""
import numpy as np
import pytest
from PIL import Image

from tests.test_ddpm import single_thread  # noqa: F401 - autouse fixture
from tests.test_sample_script import make_run, outputs, pixels, run_script


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    built = {}

    def get(name, **params):
        key = (name, tuple(sorted(params.items())))
        if key not in built:
            built[key] = make_run(tmp_path_factory.mktemp("runs"), name, **params)
        return built[key]
    return get


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """photo.png (32x32 noise), mask.png (white 16x16 square in the middle), small.png (16x16)."""
    root = tmp_path_factory.mktemp("pictures")
    photo = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(photo).save(root / "photo.png")
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(photo[:16, :16]).save(root / "small.png")
    return root, photo, mask > 0


def test_sigma_sampler_and_schedule_are_recorded_and_reproducible_per_seed(runs, tmp_path):
    run = runs("ldm_shapes_class_tiny.yaml")
    args = ["--run", run, "--class", "circle", "square", "--n", 2, "--sampler", "dpmpp_2m", "--schedule", "exponential",
            "--steps", 3, "--scale", 2]
    assert run_script(*args, "--outdir", tmp_path / "a") == 0
    assert run_script(*args, "--outdir", tmp_path / "b", "--batch_size", 1) == 0
    files, meta = outputs(tmp_path / "a")
    assert meta["images"][0]["sampler"] == {"sampler": "dpmpp_2m", "schedule": "exponential", "steps": 3, "eta": 0.0,
                                            "guidance_scale": 2.0}
    for name in files:
        assert np.abs(pixels(tmp_path / "a" / name) - pixels(tmp_path / "b" / name)).max() <= 1
    assert run_script("--run", run, "--class", "circle", "--n", 1, "--sampler", "euler_a", "--steps", 2,
                      "--outdir", tmp_path / "c") == 0
    _, meta = outputs(tmp_path / "c")
    assert meta["settings"]["schedule"] == "karras" and meta["settings"]["eta"] == 1.0  # the defaults


def test_img2img_of_an_unconditional_pixel_model_stays_near_the_picture_at_low_strength(runs, pictures, tmp_path):
    run, (root, photo, _) = runs("ddpm_shapes_tiny.yaml", timesteps=100), pictures
    change = {}
    for strength in (0.02, 1.0):
        out = tmp_path / str(strength)
        assert run_script("--run", run, "--init-image", root / "photo.png", "--strength", strength, "--n", 2,
                          "--sampler", "heun", "--steps", 4, "--outdir", out) == 0
        files, meta = outputs(out)
        change[strength] = np.abs(pixels(out / files[0]) - photo).mean()
    assert meta["settings"]["init_image"] == str(root / "photo.png") and meta["settings"]["strength"] == 1.0
    assert change[0.02] < 10 < change[1.0], change


@pytest.mark.parametrize("config, flags", [
    ("ldm_shapes_class_tiny.yaml", ["--class", "star", "--scale", 2, "--sampler", "unipc"]),
    ("ldm_shapes_uncond_tiny.yaml", ["--sampler", "ddim"]),
    ("ldm_shapes_text_tiny.yaml", ["--prompt", "a red circle", "--sampler", "euler_a"]),
])
def test_mask_with_init_image_regenerates_only_the_white_region_of_any_model(runs, pictures, tmp_path, config, flags):
    (root, photo, hole), run = pictures, runs(config)
    assert run_script("--run", run, *flags, "--init-image", root / "photo.png", "--mask", root / "mask.png",
                      "--n", 1, "--steps", 3, "--outdir", tmp_path) == 0
    files, meta = outputs(tmp_path)
    out = pixels(tmp_path / files[0])
    assert np.array_equal(out[~hole], photo[~hole]) and np.abs(out[hole] - photo[hole]).mean() > 10
    assert meta["settings"]["mask"] == str(root / "mask.png") and meta["settings"]["strength"] == 1.0


def test_editing_inputs_that_do_not_fit_are_one_clear_error(runs, pictures, tmp_path, capsys):
    root, _, _ = pictures
    ddpm, inpaint = runs("ddpm_shapes_tiny.yaml", timesteps=100), runs("ldm_photos_inpaint_tiny.yaml")
    Image.new("L", (16, 16)).save(tmp_path / "small_mask.png")
    cases = [
        (["--run", ddpm, "--mask", root / "mask.png"], "--mask needs --init-image"),
        (["--run", inpaint, "--image", root / "photo.png", "--mask", root / "mask.png", "--init-image",
          root / "photo.png"], "--init-image does not fit this model: it is an inpainting model"),
        (["--run", ddpm, "--init-image", root / "small.png"],
         "encodes to (3, 16, 16); the model samples (3, 32, 32)"),
        (["--run", ddpm, "--init-image", root / "photo.png", "--mask", tmp_path / "small_mask.png"],
         "is 16x16 px, --init-image"),
        (["--run", ddpm, "--init-image", tmp_path / "nowhere.png"], "nowhere.png': no such file"),
    ]
    for argv, message in cases:
        assert run_script(*argv, "--steps", 2, "--outdir", tmp_path / "out") == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--init-image", "p.png", "--strength", "0"], "--strength must be in (0, 1]"),
    (["--sampler", "heun", "--eta", "1"], "--eta: the heun sampler is deterministic"),
    (["--sampler", "plms", "--eta", "0.5"], "--eta: the plms sampler is deterministic"),
    (["--sampler", "ddim", "--schedule", "karras"], "--schedule karras: the ddim sampler walks the model's own"),
])
def test_command_line_mistakes_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        run_script("--run", "r", *argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
