"""The `ldmkit` console script, each command a process of its own (forked from a warm
interpreter by tests/cli_zygote.py, or the console script itself: see tests.conftest.run_ldmkit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_ldmkit

ROOT = Path(__file__).resolve().parents[1]


def ldmkit(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ldmkit *args`` in a process of its own (:func:`tests.conftest.run_ldmkit`) with this
    shell's environment plus ``env``."""
    return run_ldmkit(args, {**os.environ, **(env or {})}, cwd, timeout=300)


def test_help_lists_subcommands():
    out = ldmkit("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "evaluate", "data", "plugins"):
        assert command in out.stdout


def test_help_names_the_version_flag_and_help_of_a_command_is_that_commands():
    """Before, the usage did not mention -V/--version, and `ldmkit help train` printed the
    general usage instead of train's."""
    assert "-V, --version" in ldmkit("--help").stdout
    out = ldmkit("help", "train")
    assert out.returncode == 0 and out.stdout.startswith("usage: ldmkit train ")


def test_unknown_subcommand_fails_clearly():
    out = ldmkit("trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr


@pytest.mark.parametrize(
    "args, env",
    [(["--version"], {}), (["trian"], {}), (["plugins", "--json"], {}),
     (["plugins", "--json"], {"LDMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}),
     (["sample", "first_stage=nope"], {})],
)  # fmt: skip
def test_a_forked_command_is_the_console_script(args, env, tmp_path):
    """The suite's commands run forked from a warm interpreter (tests/cli_zygote.py) unless
    their environment differs from it: the same exit status, stdout and stderr as the
    installed console script in a plain subprocess, LDMKIT_* switches read afresh."""
    from tests.conftest import LDMKIT, _zygote

    full = {**{k: v for k, v in os.environ.items() if not k.startswith("LDMKIT_")}, **env}
    zygote = _zygote()
    assert zygote is not None and zygote.serves(full)
    forked = zygote.run(args, full, str(tmp_path), timeout=120)
    plain = subprocess.run([str(LDMKIT), *args], capture_output=True, text=True, env=full, cwd=tmp_path, timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    # the switch took effect (read afresh, not from the warm interpreter): plugins not loaded
    assert ('"status": "not loaded"' in forked.stdout) == bool(env)
    assert not zygote.serves({**full, "PYTHONPATH": str(tmp_path)})  # read at interpreter start
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run(["plugins", "--json"], full, str(tmp_path), timeout=0.001)


def test_the_console_script_exits_as_the_interpreter_would(tmp_path):
    """ldmkit.cli.exit_now skips the teardown of every module (~1 s with torch) and nothing
    else: non-daemon threads finish, atexit handlers run, buffered stdout is written, the
    exit status is the command's."""
    script = f"""
import atexit, threading, time
from pathlib import Path
from ldmkit.cli import exit_now
atexit.register(lambda: Path({str(tmp_path / "atexit")!r}).write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), Path({str(tmp_path / "thread")!r}).write_text("ran"))).start()
print("buffered", end="")
exit_now(3)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, "buffered"), done.stderr
    assert (tmp_path / "atexit").read_text() == (tmp_path / "thread").read_text() == "ran"


def test_plugins_json_lists_first_party_plugins():
    out = ldmkit("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["distribution"]: row for row in json.loads(out.stdout)}
    samplers = rows["ldmkit-samplers"]
    assert samplers["version"] == "0.1.0"
    first_party = ["ddim", "ddpm", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "euler", "euler_ancestral", "heun", "lms", "plms", "unipc"]
    assert samplers["registers"]["sampler"] == first_party
    assert samplers["config_groups"]["sampler"] == first_party
    assert rows["ldmkit-conditioners"]["registers"]["conditioner"] == [
        "class_label", "inpaint", "low_res", "multi", "none", "semantic_map"]


def test_plugins_table_matches_json():
    table = ldmkit("plugins")
    assert table.returncode == 0, table.stderr
    for row in json.loads(ldmkit("plugins", "--json").stdout):
        assert row["distribution"] in table.stdout


def test_print_config_applies_overrides():
    out = ldmkit("sample", "sampler=ddim", "sampler.steps=7", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "name: ddim" in out.stdout


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """``ldmkit ... --print-config | head -2``: before, a BrokenPipeError traceback once head
    had exited; now the command stops as cat does (status 141, a death by SIGPIPE)."""
    exe = Path(sys.executable).with_name("ldmkit")
    proc = subprocess.Popen([str(exe), "sample", "--print-config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()  # the reader is gone before anything is written
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 141 and stderr == "", stderr


def test_unknown_option_is_one_clear_line():
    out = ldmkit("sample", "sampler=dimm")
    assert out.returncode == 1
    assert "sampler/dimm" in out.stderr and "ddim" in out.stderr
    assert "Traceback" not in out.stderr


def test_sample_writes_a_png_grid(tmp_path):
    target = tmp_path / "grid.png"
    out = ldmkit("sample", "sampler=ddim", "sampler.steps=3", "image_size=16",
                 "--num-samples", "4", "--out", str(target), "--no-progress")
    assert out.returncode == 0, out.stderr
    image = Image.open(target)
    assert image.size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 2x2 grid, 2px padding


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_take_overrides(command):
    out = ldmkit(command, "trainer.max_steps=3", "--print-config")
    assert out.returncode == 0, out.stderr
    assert "max_steps: 3" in out.stdout


# -- ldmkit sample: outputs, img2img, inpainting, sizes, seeds --------------------------------
def read_png(path: Path):
    import numpy as np

    return np.asarray(Image.open(path)).astype(int)


def test_sample_writes_each_image_the_grid_and_the_settings(tmp_path):
    out = ldmkit("sample", "sampler.steps=2", "image_size=8", "--num-samples", "3", "--seed", "7",
                 "--batch-size", "2", "--out", str(tmp_path / "run" / "grid.png"), "--no-progress")
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "run" / "grid").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "run" / "grid.png").size == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))
    settings = json.loads((tmp_path / "run" / "grid.json").read_text())
    assert settings["sampler"] == {"name": "ddim", "steps": 2, "eta": 0.0, "spacing": "linspace"}
    assert settings["size"] == [8, 8] and settings["batch_size"] == 2 and settings["checkpoint"] is None
    assert settings["grid"] == "grid.png" and settings["strength"] is None
    assert settings["images"] == [{"file": f"grid/00000{i}.png", "seed": 7 + i} for i in range(3)]
    # sample i uses seed + i: --seed 8 starts at the second image, whatever the batch size
    again = ldmkit("sample", "sampler.steps=2", "image_size=8", "--num-samples", "2", "--seed", "8",
                   "--out", str(tmp_path / "again.png"), "--no-progress")
    assert again.returncode == 0, again.stderr
    for i in (0, 1):
        a = read_png(tmp_path / "run" / "grid" / f"00000{i + 1}.png")
        b = read_png(tmp_path / "again" / f"00000{i}.png")
        assert abs(a - b).max() <= 1  # 8-bit rounding of a <= 1e-4 difference


@pytest.fixture(scope="module")
def class_checkpoint(tmp_path_factory):
    """A tiny class-conditional pipeline (KL f=4, sampler ddpm) and an image and masks."""
    import numpy as np

    import ldmkit

    root = tmp_path_factory.mktemp("ckpt")
    ldmkit.compose(overrides=["conditioner=class_label", "first_stage=kl_tiny", "first_stage.encode_mode=mode",
                              "image_size=16", "sampler=ddpm"]).save(root / "pipeline")  # fmt: skip
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "photo.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255  # white = repaint
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "small_mask.png")
    return root


def test_sampler_overrides_change_the_checkpoints_sampler_or_switch_it(class_checkpoint, tmp_path):
    ckpt = str(class_checkpoint / "pipeline")
    out = ldmkit("sample", "--checkpoint", ckpt, "sampler.steps=3", "--labels", "1,2",
                 "--out", str(tmp_path / "a.png"), "--no-progress")
    assert out.returncode == 0, out.stderr
    settings = json.loads((tmp_path / "a.json").read_text())
    assert settings["sampler"] == {"name": "ddpm", "steps": 3, "spacing": "linspace"}
    assert settings["conditions"] == {"label": [1, 2]}
    assert [(e["seed"], e["label"]) for e in settings["images"]] == [(0, 1), (1, 2)]

    out = ldmkit("sample", "--checkpoint", ckpt, "sampler=ddim", "sampler.steps=4", "sampler.spacing=paper",
                 "--labels", "3", "--num-samples", "2", "--init-image", str(class_checkpoint / "photo.png"),
                 "--strength", "0.5", "--mask", str(class_checkpoint / "mask.png"), "--seed", "4",
                 "--out", str(tmp_path / "b.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    settings = json.loads((tmp_path / "b.json").read_text())
    assert settings["sampler"] == {"name": "ddim", "steps": 4, "eta": 0.0, "spacing": "paper"}
    assert settings["init_image"].endswith("photo.png") and settings["mask"].endswith("mask.png")
    assert settings["strength"] == 0.5 and settings["size"] == [16, 16]
    assert [e["seed"] for e in settings["images"]] == [4, 5]
    assert read_png(tmp_path / "b" / "000000.png").shape == (16, 16, 3)


def test_show_conditions_draws_the_init_image_and_the_mask_too(class_checkpoint, tmp_path):
    """--show-conditions with --init-image and --mask: each row is the label, the image, the
    mask, then the sample (they are inputs of the sample as much as its label is)."""
    import numpy as np

    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "sampler.steps=2", "--labels", "3",
                 "--num-samples", "2", "--init-image", str(class_checkpoint / "photo.png"), "--mask",
                 str(class_checkpoint / "mask.png"), "--show-conditions", "--out", str(tmp_path / "g.png"),
                 "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    grid = read_png(tmp_path / "g.png")
    assert grid.shape == (2 + 2 * 18, 2 + 4 * 18, 3)  # 2 rows of label | image | mask | sample
    for row in (0, 1):
        top = 2 + row * 18
        np.testing.assert_array_equal(grid[top : top + 16, 20:36], read_png(class_checkpoint / "photo.png"))
        mask = read_png(class_checkpoint / "mask.png")
        np.testing.assert_array_equal(grid[top : top + 16, 38:54], np.repeat(mask[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("image_size=32", "--image-size"),  # before: sampled 16x16, the checkpoint's size, silently
        ("seed=5", "--seed"),
        ("schedule.kind=cosine", None),
        ("first_stage=kl_f8", None),
        ("experiment=fmnist_ldm_kl_f4", None),
    ],
)
def test_with_a_checkpoint_a_model_override_is_refused_not_ignored(class_checkpoint, tmp_path, override, hint):
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), override, "--labels", "1",
                 "--out", str(tmp_path / "x.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"ldmkit sample: error: {override}: not applied with --checkpoint"), out.stderr
    assert hint is None or f"use {hint}" in out.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_checkpoint_folder_without_the_flag_is_named(class_checkpoint):
    out = ldmkit("sample", str(class_checkpoint / "pipeline"), "--print-config")
    assert out.returncode == 1
    assert out.stderr == (f"ldmkit sample: error: {class_checkpoint / 'pipeline'}: an override is KEY=VALUE "
                          f"(did you mean --checkpoint {class_checkpoint / 'pipeline'}?)\n")


@pytest.mark.parametrize("name", ["o.txt", "grid.safetensors"])
def test_an_out_name_no_image_format_has_is_refused_before_sampling(class_checkpoint, tmp_path, name):
    """Before, ``--out o.txt`` wrote PNG bytes under that name, silently."""
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "--labels", "1",
                 "--out", str(tmp_path / name), "--no-progress")  # fmt: skip
    assert out.returncode == 1
    stem = name.rsplit(".", 1)[0]
    assert out.stderr == (f"ldmkit sample: error: --out {tmp_path / name}: .{name.rsplit('.', 1)[1]} is not an image "
                          f"format PIL writes; name the grid {stem}.png (or .jpg, .webp)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_jpeg_grid_is_written_as_jpeg(class_checkpoint, tmp_path):
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "--labels", "1",
                 "--out", str(tmp_path / "grid.jpg"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    with Image.open(tmp_path / "grid.jpg") as grid:
        assert grid.format == "JPEG"


def test_print_config_with_a_checkpoint_shows_the_checkpoints_config(class_checkpoint):
    """Before, it printed the config composed from ldmkit's defaults (first_stage identity,
    image_size 32), not the checkpoint's that sampling uses."""
    import yaml

    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "sampler.steps=3",
                 "attention.backend=math", "--print-config")  # fmt: skip
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["first_stage"]["name"] == "kl" and shown["image_size"] == 16
    assert shown["conditioner"]["name"] == "class_label"
    assert shown["sampler"] == {"name": "ddpm", "steps": 3, "spacing": "linspace"}
    assert shown["attention"]["backend"] == "math"
    missing = ldmkit("sample", "--checkpoint", str(class_checkpoint / "nothing"), "--print-config")
    assert missing.returncode == 1 and missing.stderr.startswith("ldmkit sample: error: checkpoint file missing:")


def test_euler_samples_on_karras_noise_levels_with_img2img_and_a_mask(class_checkpoint, tmp_path):
    ckpt = str(class_checkpoint / "pipeline")
    flags = ["--labels", "3", "--seed", "4", "--init-image", str(class_checkpoint / "photo.png"),
             "--strength", "0.5", "--mask", str(class_checkpoint / "mask.png"), "--no-progress"]  # fmt: skip
    out = ldmkit("sample", "--checkpoint", ckpt, "sampler=euler", "sampler.steps=4", "sampler.spacing=karras",
                 *flags, "--out", str(tmp_path / "karras.png"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    settings = json.loads((tmp_path / "karras.json").read_text())
    assert settings["sampler"] == {"name": "euler", "steps": 4, "spacing": "karras", "quantize": False,
                                   "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0}
    assert "Infinity" not in (tmp_path / "karras.json").read_text()  # strict JSON (s_tmax: no bound is null)
    out = ldmkit("sample", "--checkpoint", ckpt, "sampler=euler", "sampler.steps=4", *flags,
                 "--out", str(tmp_path / "linspace.png"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    karras, linspace = read_png(tmp_path / "karras" / "000000.png"), read_png(tmp_path / "linspace" / "000000.png")
    assert karras.shape == (16, 16, 3) and abs(karras - linspace).max() > 1  # other noise levels


def test_height_and_width_sample_a_non_square_grid(class_checkpoint, tmp_path):
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "sampler.steps=2",
                 "--labels", "1", "--height", "32", "--width", "16", "--out", str(tmp_path / "tall.png"),
                 "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "tall" / "000000.png").size == (16, 32)  # PIL: width, height
    assert json.loads((tmp_path / "tall.json").read_text())["size"] == [32, 16]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-image", "{photo}", "--mask", "{small_mask}"], "mask has shape (1, 1, 8, 8), but init_image"),
        (["--init-image", "{photo}", "--strength", "1.5"], "strength must be in (0, 1], got 1.5"),
        (["--init-image", "{photo}", "--strength", "0"], "strength must be in (0, 1], got 0.0"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--height", "18"], "size 18x16 is not divisible by the first stage's downsample factor f=4"),
        (["--init-image", "{folder}"], "--init-image: {folder} is a folder, not an image file"),
    ],
)
def test_bad_sampling_inputs_are_one_line(class_checkpoint, tmp_path, args, message):
    files = {"photo": class_checkpoint / "photo.png", "small_mask": class_checkpoint / "small_mask.png",
             "folder": class_checkpoint}  # fmt: skip
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "sampler.steps=2", "--labels", "1",
                 *[a.format(**files) for a in args], "--out", str(tmp_path / "x.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message.format(**files) in out.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_16_bit_grayscale_png_reads_as_its_8_bit_twin(tmp_path):
    """--init-image / --mask of a 16-bit PNG (mode I;16): PIL's convert() clips it at 255,
    which made nearly every pixel white."""
    import numpy as np

    from ldmkit.sample_io.conditions import load_image, load_mask

    eight = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(eight).save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    for channels in (1, 3):
        expected = load_image(tmp_path / "8.png", channels=channels, flag="--init-image")
        assert load_image(tmp_path / "16.png", channels=channels, flag="--init-image").equal(expected)
    assert load_mask(tmp_path / "16.png", flag="--mask").equal(load_mask(tmp_path / "8.png", flag="--mask"))


def test_a_transparent_png_reads_composited_on_white_as_training_data_is(tmp_path):
    """An RGBA cut-out as --init-image / --cond image: convert() kept the colour stored under
    transparent pixels (black here) where training data composites them on white."""
    import numpy as np

    from ldmkit.data.transforms import ImageTransform
    from ldmkit.sample_io.conditions import load_image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 2:6] = (200, 40, 40, 255)  # an opaque red square on a transparent black field
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    for channels in (1, 3):
        loaded = load_image(tmp_path / "cutout.png", channels=channels, flag="--init-image")
        trained, _ = ImageTransform(image_size=8, channels=channels)(Image.open(tmp_path / "cutout.png"))
        assert loaded[0].equal(trained)  # the same pixels as the training data's transform
        assert loaded[0, :, 0, 0].eq(1.0).all()  # the transparent corner: white


# -- labels by name, --num-samples per label, --rows --------------------------------------------
@pytest.fixture(scope="module")
def named_checkpoint(tmp_path_factory):
    """A tiny class-conditional pipeline whose conditioner names its three classes."""
    import ldmkit

    root = tmp_path_factory.mktemp("named")
    ldmkit.compose(overrides=["conditioner=class_label", "conditioner.num_classes=3",
                              "conditioner.class_names=[sandal,bag,coat]", "image_size=8",
                              "sampler.steps=2"]).save(root / "pipeline")  # fmt: skip
    return root / "pipeline"


def grid_shape(path: Path, side: int) -> tuple[int, int]:
    """(rows, columns) of a grid of side x side tiles with torchvision's 2 px padding."""
    width, height = Image.open(path).size
    return (height - 2) // (side + 2), (width - 2) // (side + 2)


def test_labels_by_name_sample_num_samples_per_label(named_checkpoint, tmp_path):
    out = ldmkit("sample", "--checkpoint", str(named_checkpoint), "--labels", "coat,bag", "--num-samples", "3",
                 "--seed", "5", "--batch-size", "2", "--out", str(tmp_path / "named.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    settings = json.loads((tmp_path / "named.json").read_text())
    assert [(e["seed"], e["label"], e["label_name"]) for e in settings["images"]] == [
        (5, 2, "coat"), (6, 2, "coat"), (7, 2, "coat"), (8, 1, "bag"), (9, 1, "bag"), (10, 1, "bag")]
    assert settings["num_samples"] == 6
    assert settings["conditions"] == {"label": [2, 2, 2, 1, 1, 1]}
    assert grid_shape(tmp_path / "named.png", 8) == (2, 3)  # one row per label
    # names are the indices they stand for; sample i is seed + i whatever the batch
    out = ldmkit("sample", "--checkpoint", str(named_checkpoint), "--labels", "1", "--seed", "9",
                 "--out", str(tmp_path / "one.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert abs(read_png(tmp_path / "one" / "000000.png") - read_png(tmp_path / "named" / "000004.png")).max() <= 1
    # --rows lays the grid out in that many rows
    out = ldmkit("sample", "--checkpoint", str(named_checkpoint), "--labels", "0,1,2", "--num-samples", "2",
                 "--rows", "2", "--out", str(tmp_path / "rows.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert grid_shape(tmp_path / "rows.png", 8) == (2, 3)
    assert [e["label"] for e in json.loads((tmp_path / "rows.json").read_text())["images"]] == [0, 0, 1, 1, 2, 2]


def test_rows_without_labels_and_a_single_label_repeated(named_checkpoint, tmp_path):
    out = ldmkit("sample", "sampler.steps=2", "image_size=8", "--num-samples", "6", "--rows", "3",
                 "--out", str(tmp_path / "u.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert grid_shape(tmp_path / "u.png", 8) == (3, 2)
    out = ldmkit("sample", "--checkpoint", str(named_checkpoint), "--labels", "bag", "--num-samples", "4",
                 "--out", str(tmp_path / "one.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert grid_shape(tmp_path / "one.png", 8) == (2, 2)  # one label: a square grid, as unconditional
    assert [e["label"] for e in json.loads((tmp_path / "one.json").read_text())["images"]] == [1] * 4


def test_labels_by_the_datasets_class_names(class_checkpoint, tmp_path):
    """A conditioner without class_names: the names of the data it was trained on (Fashion-MNIST's
    here, as the demo shows them), matched without regard to case."""
    out = ldmkit("sample", "--checkpoint", str(class_checkpoint / "pipeline"), "sampler.steps=1",
                 "--labels", "sandal,Bag", "--out", str(tmp_path / "f.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 0, out.stderr
    images = json.loads((tmp_path / "f.json").read_text())["images"]
    assert [(e["label"], e["label_name"]) for e in images] == [(5, "Sandal"), (8, "Bag")]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("sandal,boot", "--labels 'sandal,boot': unknown class name 'boot'; the classes are: sandal, bag, coat"),
        ("bag,-1", "--labels 'bag,-1': expected class ids (integers >= 0) or class names"),
    ],
)
def test_an_unknown_class_name_is_one_line_naming_the_known_ones(named_checkpoint, tmp_path, labels, message):
    out = ldmkit("sample", "--checkpoint", str(named_checkpoint), "--labels", labels,
                 "--out", str(tmp_path / "x.png"), "--no-progress")  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x").exists()


def test_the_trainers_warnings_are_one_line_each(tmp_path):
    """An option the stage does not read (with the one meant), an untrained first stage and a
    missing validation split: before, each was Python's two lines (file:line and the source)."""
    from tests.training.faults import make_shards

    shards = make_shards(tmp_path)
    out = ldmkit("train", "stage=ldm", "first_stage=kl_tiny", "trainer=ldm_tiny", "denoiser=unet_tiny",
                 "data=image_folder", f"data.path={shards}", "image_size=16", "trainer.max_steps=1",
                 "trainer.batch_size=2", "trainer.num_workers=0", "trainer.num_threads=1", "trainer.progress=false",
                 "trainer.tensorboard=false", "trainer.sample_every=0", "trainer.val_split=test",
                 "+trainer.sample_stepz=3", f"run_dir={tmp_path / 'run'}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "ldmkit train: warning: trainer option(s) trainer.sample_stepz (did you mean trainer.sample_steps?) "
        "are not used by stage=ldm",
        "ldmkit train: warning: first_stage.checkpoint is not set: the latents come from an untrained first "
        "stage (train one with stage=autoencoder and pass first_stage.checkpoint=<its run_dir>)",
        "ldmkit train: warning: trainer.val_split='test' is not in data=image_folder (it has train, val); "
        "validation is skipped and grids use training batches. Prepare the data with val_fraction=... or set "
        "trainer.val_split",
    ]


def test_auto_val_split_on_data_without_a_held_out_one_says_so_once(tmp_path):
    """``auto`` on train-only data: no validation and one warning that names what the data has
    (before: "trainer.val_split='test' is not in data", as if test had been asked for)."""
    from ldmkit.config import compose_config
    from ldmkit.data import prepare
    from ldmkit.training.data import validation_split
    from ldmkit.training.errors import TrainingWarning
    from tests.data.conftest import make_image_folder

    make_image_folder(tmp_path / "flat", per_class=1)
    prepare("image_folder", tmp_path / "train_only", path=str(tmp_path / "flat"), progress=False)
    cfg = compose_config(["data=image_folder", f"data.path={tmp_path / 'train_only'}"])
    assert cfg.trainer.val_split == "auto"
    with pytest.warns(TrainingWarning) as caught:
        assert validation_split(cfg, "auto") is None
    assert [str(w.message) for w in caught] == [
        "data=image_folder has no held-out split (val or test; it has train): validation is skipped "
        "and grids use training batches. Prepare it with val_fraction=... for a val split"
    ]
    assert validation_split(cfg, "auto", factory=True) == "test"  # a data factory: as before


def test_a_run_dir_under_home_is_written_there_and_the_default_splits_are_the_held_out_one(tmp_path):
    """``run_dir="~/runs/ae"`` (quoted for Hydra): before, training wrote ./~/runs/ae, a
    folder named ``~`` in the working directory (``data.path`` and checkpoints expand it).
    The same run checks the default splits: before, the default ``trainer.val_split=test``
    skipped validation on data prepared with ``val_fraction`` (train + val), with a warning that
    said to prepare a val split; now ``auto`` validates on ``val`` (else ``test``) without a
    word, and ``evaluate``'s ``eval.split=auto`` reads the same split."""
    import csv

    from tests.training.faults import make_shards

    shards, home, cwd = make_shards(tmp_path), tmp_path / "home", tmp_path / "cwd"  # train + val
    home.mkdir()
    cwd.mkdir()
    out = ldmkit("train", "stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
                 "data=image_folder", f"data.path={shards}", "image_size=16", "trainer.max_steps=1",
                 "trainer.batch_size=2", "trainer.num_workers=0", "trainer.num_threads=1", "trainer.progress=false",
                 "trainer.tensorboard=false", "trainer.sample_every=0",
                 'run_dir="~/runs/ae"', cwd=cwd, env={"HOME": str(home)})  # fmt: skip
    assert (out.returncode, out.stderr) == (0, "")
    assert not (cwd / "~").exists()
    run = home / "runs" / "ae"
    assert (run / "checkpoints").is_dir()
    with open(run / "metrics.csv") as f:
        assert "val/psnr" in next(csv.reader(f))
    out = ldmkit("evaluate", "stage=autoencoder", "data=image_folder", f"data.path={shards}", "image_size=16",
                 "eval.lpips=false", "eval.fid_features=none", 'run_dir="~/runs/ae"',
                 cwd=cwd, env={"HOME": str(home)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not (cwd / "~").exists()
    [report] = (run / "eval").glob("*.json")
    assert report.name == "autoencoder_val_step_1.json" and json.loads(report.read_text())["split"] == "val"


@pytest.mark.parametrize(
    ("name", "text"),
    [("config.yaml", "my precious config\n"), ("metrics.csv", "date,weight\n2026-12-01,71.5\n")],
)
def test_a_run_dir_holding_files_ldmkit_did_not_write_is_refused(tmp_path, name, text):
    """run_dir=. in a project folder: before, training overwrote its config.yaml (and appended to
    its metrics.csv, then died with a ValueError traceback)."""
    (tmp_path / name).write_text(text)
    out = ldmkit("train", "stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
                 "trainer.max_steps=1", "run_dir=.", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.startswith(f"ldmkit train: error: run_dir=. holds {name}, which no ldmkit run wrote"), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and (tmp_path / name).read_text() == text


@pytest.mark.parametrize("command", ["train", "sample"])
def test_overrides_may_follow_flags(command):
    """Before: argparse took the positionals in one run, so an override after a flag was
    'unrecognized arguments: sampler.steps=7' (ldmkit sample --labels 3 sampler.steps=7)."""
    flags = ["--seed", "1"] if command == "sample" else ["--config-dir", "."]
    out = ldmkit(command, "image_size=8", *flags, "sampler.steps=7", "--print-config", "seed=5")
    assert out.returncode == 0, out.stderr
    assert "steps: 7" in out.stdout and "seed: 5" in out.stdout and "image_size: 8" in out.stdout


def test_ldmkits_own_warnings_in_sample_are_one_line(tmp_path):
    """Guidance over a conditioner trained without dropout warns; the CLI printed Python's
    two-line form (the file, line number and source of the warn call)."""
    from ldmkit import compose

    compose(overrides=["conditioner=class_label", "conditioner.drop_rate=0", "first_stage=kl_tiny",
                              "image_size=8", "sampler.steps=2"]).save(tmp_path / "pipeline")  # fmt: skip
    result = ldmkit(
        "sample", "--checkpoint", str(tmp_path / "pipeline"), "--labels", "1", "--guidance-scale", "3",
        "--out", str(tmp_path / "grid.png"),
    )
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "never trained" in line]
    assert len(warned) == 1 and warned[0].lstrip("\r").split("ldmkit sample: warning: ")[1].startswith(
        "guidance_scale=3.0 with conditioner ClassLabelConditioner"
    ), result.stderr
    assert "UserWarning" not in result.stderr and "warnings.warn(" not in result.stderr
