"""Every bad value is one line naming its key (issue 10, item 5), and a read-only or full disk
is one line naming the path, with nothing written before lost.

Most cases run ``ldmkit.cli.main`` in this process (the code path of the console script,
without an interpreter start-up each); a few run the real ``ldmkit`` executable. Full disks
are simulated with ``RLIMIT_FSIZE`` (writes beyond the limit fail with EFBIG), read-only
folders with a read-only bind mount in a private mount namespace (``unshare``), or with
``chmod`` where the tests do not run as root.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.cli import main
from ldmkit.config import compose_config
from tests.training import faults

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file systems and rlimits")

LDMKIT = Path(sys.executable).with_name("ldmkit")


def error_line(stderr: str, command: str) -> str:
    """The CLI's one error line; fails when there is none, several, or a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"ldmkit {command}: error: ")]
    assert len(errors) == 1, stderr
    return errors[0].removeprefix(f"ldmkit {command}: error: ")


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """``ldmkit ARGV`` in process: (exit code, the one error line)."""
    import torch

    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        code = main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return code, error_line(capsys.readouterr().err, argv[0])


def ldmkit(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    preexec_fn=None,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), str(LDMKIT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        preexec_fn=preexec_fn,
        timeout=300,
    )


# -- wrong types and impossible values, every kind of key ---------------------------------------
# (override, what the one line must say); each is composed, none trains
TRAIN_CASES = [
    # typed keys (declared by their owners: ldmkit.config.primary_keys, ldmkit.training.schema,
    # ldmkit.data.schema): integers, numbers, switches, choices, lists
    ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: expected an integer >= 1"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5: expected an integer >= 1"),
    ("trainer.max_steps=null", "trainer.max_steps=null: expected an integer >= 1"),
    ("trainer.batch_size=0", "trainer.batch_size=0: expected an integer >= 1"),
    ("trainer.lr=abc", "trainer.lr='abc': expected a number > 0"),
    ("trainer.lr=nan", "trainer.lr=nan: expected a number > 0"),
    ("trainer.lr=-0.1", "trainer.lr=-0.1: expected a number > 0"),
    ("trainer=ldm trainer.max_minutes=0", "trainer.max_minutes=0: expected a number > 0 or null"),
    ("trainer=ldm trainer.resume=maybe", "trainer.resume='maybe': expected true or false"),
    ("trainer.device=gpu7", "trainer.device='gpu7': expected auto or a torch device"),
    ("trainer.num_workers=-1", "trainer.num_workers=-1: expected an integer >= 0"),
    ("data.image_size=abc", "data.image_size='abc': expected an integer >= 1"),
    ("data.crop=diagonal", "data.crop='diagonal': expected one of center, random"),
    ("data.channels=2", "data.channels=2: expected one of 1, 3"),
    ("image_size=abc", "image_size='abc': expected an integer >= 1 or null"),
    ("seed=abc", "seed='abc': expected an integer"),
    # beyond what torch.manual_seed takes: before, "ValueError: Overflow when unpacking long long" once training began
    (
        "seed=18446744073709551616",
        "seed=18446744073709551616: expected an integer >= -9223372036854775808 and <= 18446744073709551615",
    ),
    ("schedule.timesteps=0", "schedule.timesteps=0: expected an integer >= 1"),
    (
        "attention.backend=fast",
        "attention.backend='fast': expected one of auto, sdpa, xformers, math, chunked",
    ),
    ("scale_factor=-1", "scale_factor=-1: expected a number > 0 or one of scale_by_std"),
    # before: "RuntimeError: [enforce fail at alloc_cpu.cpp:127] ... you tried to allocate 8000000000000 bytes"
    ("schedule.timesteps=1000000000000", "schedule.timesteps=1000000000000 needs 32.0 TB, but "),
    # schedules that leave nothing to sample: before, all-black images and NaN losses
    # (linear_end=2, linear_start=1: the config schema's rows below)
    (
        "schedule.linear_start=0.9 schedule.linear_end=0.99",
        "schedule config: alphas_cumprod falls to 0 by t=1000: no signal is left",
    ),
    # stage-specific trainer keys
    ("trainer=ldm trainer.guidance_scale=-1", "trainer.guidance_scale=-1: expected a number >= 0"),
    ("trainer=ldm trainer.betas=[0.9]", "trainer.betas=[0.9]: expected a list of 2 numbers"),
    (  # Adam's betas are < 1 (torch's ValueError traceback before, in both stages)
        "trainer=ldm_tiny trainer.betas=[0.9,1.0]",
        "trainer.betas=[0.9, 1.0]: expected a list of 2 numbers, each >= 0 and < 1",
    ),
    ("trainer=ldm trainer.ema.decay=2", "trainer.ema.decay=2: expected a number >= 0 and <= 1"),
    ("trainer=ldm trainer.precision=fp8", "trainer.precision='fp8': expected one of auto, fp32, bf16, fp16"),
    # nodes of a core constructor's arguments: checked against its type hints
    (
        "trainer=autoencoder_tiny trainer.loss.disc_start=abc",
        "trainer.loss.disc_start='abc': expected an integer",
    ),
    # ... and their ranges, by the constructor: one line before anything is written, never a
    # traceback (nor a silently ignored negative weight)
    *[
        (f"stage=autoencoder first_stage=kl_tiny trainer=autoencoder_tiny trainer.loss.{key}", message)
        for key, message in [
            ("disc_weight=-1", "trainer.loss: disc_weight must be >= 0, got -1"),
            ("perceptual_weight=-0.5", "trainer.loss: perceptual_weight must be >= 0, got -0.5"),
            ("disc_start=-3", "trainer.loss: disc_start must be >= 0, got -3"),
            ("disc_ndf=0", "trainer.loss: disc_ndf must be >= 1, got 0"),
            ("disc_num_layers=0", "trainer.loss: disc_num_layers must be >= 1, got 0"),
            ("disc_loss=wgan", "trainer.loss: unknown disc_loss 'wgan'; expected one of ('hinge', 'vanilla')"),
            # an image smaller than the discriminator's patches (2 layers: 12 px) with the
            # adversarial term on within the run (autoencoder_tiny: disc_start 10 of 20 steps)
            ("disc_num_layers=2 image_size=8",
             "image_size=8 is smaller than the patch discriminator reads (12 px with trainer.loss.disc_num_layers=2)"),
            ("reduction=median", "trainer.loss: unknown reduction 'median'; expected one of ('mean', 'sum')"),
            ("lpips_trunk=alexnet", "trainer.loss: unknown LPIPS trunk 'alexnet'"),
            (
                "disc_in_channels=1",
                "trainer.loss.disc_in_channels=1: the discriminator judges the first stage's "
                "reconstructions, which have 3 channels; leave it at auto",
            ),
        ]
    ],
    (  # a gray preset with an RGB first stage: stopped at the first batch, naming no fix
        "experiment=fmnist_kl_f4 first_stage=vq_tiny",
        "data.channels=1 but first_stage=vq_tiny takes 3-channel images; use a first stage that "
        "follows data.channels (first_stage=kl_f4_data, kl_f4_small_data, vq_f4_small_data), "
        "or data.channels=3 (gray replicated to RGB)",
    ),
    (  # an autoencoder reconstructs its input (was a traceback in the first step)
        "stage=autoencoder first_stage=kl_tiny trainer=autoencoder_tiny first_stage.in_channels=1 "
        "first_stage.out_ch=3 data.channels=1",
        "first_stage.in_channels=1 and first_stage.out_ch=3: stage=autoencoder trains the first "
        "stage to reconstruct its input, so they must be equal",
    ),
    (
        "trainer=ldm trainer.objective.min_snr_gamma=x",
        "trainer.objective.min_snr_gamma='x': expected a number or null",
    ),
    # ... and the diffusion objective's ranges, by its constructor (tracebacks before)
    *[
        (f"trainer=ldm_tiny trainer.objective.{key}", message)
        for key, message in [
            ("loss_type=huber", "trainer.objective: unknown loss type 'huber'; expected one of ('l2', 'l1')"),
            ("min_snr_gamma=0", "trainer.objective: min_snr_gamma must be > 0, got 0"),
            ("logvar_init=nan", "trainer.objective: logvar_init must be a finite number, got nan"),
        ]
    ],
    (  # CompVis' DDPM has l_simple_weight; ldmkit's objective does not (a TypeError before)
        "trainer=ldm_tiny +trainer.objective.l_simple_weight=2",
        "trainer.objective: DiffusionObjective.__init__() got an unexpected keyword argument 'l_simple_weight'",
    ),
    ("trainer=ldm_tiny trainer.objective=5", "trainer.objective=5: expected a mapping of keyword arguments"),
    # a beta of 1 or more is no noise schedule (trained silently before)
    ("schedule.linear_end=2", "schedule.linear_end=2: expected a number > 0 and < 1"),
    ("schedule.linear_start=1", "schedule.linear_start=1: expected a number > 0 and < 1"),
    (  # the sample grids' DDIM steps (a traceback-free error at the first grid before, after
        # training had started; naming no key)
        "trainer=ldm_tiny schedule.timesteps=10 trainer.sample_steps=50",
        "trainer.sample_steps=50 is more than the schedule's 10 timesteps (schedule.timesteps): give at most 10",
    ),
    # a key that does not exist, an option that does not exist
    (
        "trainer.optimizer.lr=abc",
        "trainer.optimizer.lr: no such key in the config (did you mean trainer.lr?)",
    ),
    ("trainer.lrr=3", "trainer.lrr: no such key in the config (did you mean trainer.lr?)"),
    # a misspelled group: before, "(did you mean first_stage.name?); to add a new key, write +first_stag=..."
    ("first_stag=kl_tiny", "first_stag: no such config group or key (did you mean first_stage=kl_tiny?)"),
    ("samplr=ddpm", "samplr: no such config group or key (did you mean sampler=ddpm?)"),
    ("expriment=fmnist_kl_f4", "expriment: no such config group or key (did you mean experiment=fmnist_kl_f4?)"),
    ("sampler=dimm", "unknown option sampler=dimm"),
    # a group choice that YAML reads as a number, a switch or null: before, a ValueError traceback
    ("sampler=1", "sampler=1: a config group takes the name of an option, not 1; sampler options: ddim, ddpm,"),
    ("experiment=2024", "experiment=2024: a config group takes the name of an option, not 2024; experiment options:"),
    ("trainer=null", "trainer=null: a config group takes the name of an option, not null; trainer options:"),
    ("=3", "=3: an override is KEY=VALUE; the key is missing"),
    # a word without '=': before, "Error parsing override 'fmnist_kl_f4' missing EQUAL at '<EOF>' See https://..."
    ("fmnist_kl_f4", "fmnist_kl_f4: an override is KEY=VALUE (did you mean experiment=fmnist_kl_f4?)"),
    ("kl_tiny", "kl_tiny: an override is KEY=VALUE (did you mean first_stage=kl_tiny?)"),
    ("lr", "lr: an override is KEY=VALUE, e.g. trainer.max_steps=100 or experiment=NAME"),
    # characters Hydra's grammar takes only quoted: before, "LexerNoViableAltException: ... ^ See https://..."
    (
        "data.path=~/photos",
        "data.path=~/photos: Hydra cannot parse this override; quote the value: 'data.path=\"~/photos\"'",
    ),
    ("run_dir=runs/café", "run_dir=runs/café: Hydra cannot parse this override; quote the value: 'run_dir=\"runs/café\"'"),
    ("run_dir=runs/a(1)", "run_dir=runs/a(1): Hydra cannot parse this override; quote the value"),
    ("experiment=fmnist_kl_f5", "unknown option experiment=fmnist_kl_f5"),
    # component configs: checked against the registered constructor's type hints when built
    ("sampler.eta=abc", "sampler.eta='abc': expected a number (sampler=ddim)"),
    ("sampler.steps=abc", "sampler.steps='abc': expected an integer (sampler=ddim)"),
    ("sampler.steps=-3", "sampler=ddim: cannot build sampler 'ddim': steps must be >= 1, got -3"),
    (
        "sampler.spacing=karras",
        "sampler=ddim: cannot build sampler 'ddim': DDIMSampler takes no spacing 'karras' (a grid "
        "of noise levels, for the sigma samplers: SigmaSampler); expected one of ['leading', "
        "'linspace', 'paper', 'quad', 'trailing']",
    ),
    (
        "first_stage=kl_tiny first_stage.ch_mult=[1,a]",
        "first_stage.ch_mult=[1, 'a']: expected a list of integers",
    ),
    (
        "conditioner=class_label conditioner.num_classes=1.5",
        "conditioner.num_classes=1.5: expected an integer (conditioner=class_label)",
    ),
    (
        "first_stage=kl_tiny first_stage.encode_mode=7",
        "first_stage.encode_mode=7: expected a string",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_a_bad_value_is_one_line_naming_the_key(overrides, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, line = run_main(capsys, "train", *overrides.split(), f"run_dir={run_dir}")
    assert code == 1
    assert line.startswith(message), line
    assert not run_dir.exists()  # nothing written


def test_a_misspelled_key_is_not_told_to_be_added(capsys, tmp_path):
    """With a key meant found, the line does not end "to add a new key, write +trainer.lrr=3":
    the added key would be read by nothing. Without one, it still says how to add a key."""
    code, line = run_main(capsys, "train", "trainer.lrr=3", f"run_dir={tmp_path}/run")
    assert code == 1 and line == "trainer.lrr: no such key in the config (did you mean trainer.lr?)"
    code, line = run_main(capsys, "train", "trainer.zzz=3", f"run_dir={tmp_path}/run")
    assert code == 1 and line == "trainer.zzz: no such key in the config; to add a new key, write +trainer.zzz=3"


def test_several_bad_values_are_named_in_one_line(capsys, tmp_path):
    code, line = run_main(
        capsys, "train", "trainer.max_steps=abc", "trainer.batch_size=-1", f"run_dir={tmp_path}/run"
    )
    assert code == 1
    assert line == (
        "trainer.max_steps='abc': expected an integer >= 1; "
        "trainer.batch_size=-1: expected an integer >= 1"
    )


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        (
            "evaluate",
            ["stage=autoencoder", "eval.batch_size=abc"],
            "eval.batch_size='abc': expected an integer >= 1",
        ),
        (
            "evaluate",
            ["stage=autoencoder", "eval.fid_features=clip"],
            "eval.fid_features='clip': expected one of",
        ),
        ("sample", ["sampler.eta=abc"], "sampler.eta='abc': expected a number (sampler=ddim)"),
        (
            "sample",
            ["image_size=8", "--guidance-scale", "-2"],
            "--guidance-scale must be a number >= 0",
        ),
        (
            "sample",
            ["image_size=8", "--guidance-scale", "nan"],
            "--guidance-scale must be a number >= 0",
        ),
        ("sample", ["image_size=8", "--num-samples", "0"], "--num-samples must be a whole number >= 1, got 0"),
        # the flag itself, not "size ... got (0, 0)"
        ("sample", ["image_size=8", "--height", "0"], "--height must be a whole number >= 1, got 0"),
        ("sample", ["image_size=8", "--width", "-4"], "--width must be a whole number >= 1, got -4"),
        ("sample", ["image_size=8", "--image-size", "0"], "--image-size must be a whole number >= 1, got 0"),
        (
            "sample",
            ["conditioner=class_label", "--labels", "abc"],
            "--labels 'abc': unknown class name 'abc'; the classes are: T-shirt/top, Trouser,",
        ),
        (
            "sample",
            ["conditioner=class_label", "--labels", "1,-2"],
            "--labels '1,-2': expected class ids",
        ),
        # the shorthand named, not the --cond item it stands for
        ("sample", ["image_size=8", "--labels", "3"], "--labels: the conditioner reads no key 'label'; it reads nothing"),
        (
            "sample",
            ["conditioner=class_label", "--prompt", "a cat"],
            "--prompt: the conditioner reads no key 'caption'; it reads ['label']",
        ),
        (  # beyond int64: was an OverflowError traceback
            "sample",
            ["conditioner=class_label", "--labels", "1,99999999999999999999"],
            "--labels '1,99999999999999999999': class id 99999999999999999999 is out of range",
        ),
        (  # a label past the table: the message named no flag
            "sample",
            ["conditioner=class_label", "--labels", "10"],
            "class labels must be in [0, 10) (conditioner.num_classes=10); got min 10, max 10 (inputs: --labels=10)",
        ),
        (  # the flag that gives the missing condition named
            "sample",
            ["conditioner=class_label"],
            "conditioner ClassLabelConditioner reads batch key 'label', but the batch has keys []; give --labels",
        ),
        (  # with --num-samples: was a TypeError traceback (the flags' dict replaced by a count)
            "sample",
            ["conditioner=class_label", "--labels", "3,99", "--num-samples", "2"],
            "class labels must be in [0, 10) (conditioner.num_classes=10); got min 3, max 99 (inputs: --labels=3,99)",
        ),
    ],
)
def test_bad_values_of_evaluate_and_sample(command, args, message, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, line = run_main(
        capsys,
        command,
        *args,
        *(["--out", str(out), "--no-progress"] if command == "sample" else []),
    )
    assert code == 1
    assert line.startswith(message), line
    assert not out.exists() and not (tmp_path / "grid").exists()


def test_a_mistyped_flag_is_one_line_too():
    """argparse's own errors: one line (no usage block), exit code 2."""
    out = ldmkit("sample", "--seed", "abc")
    assert out.returncode == 2
    assert (
        error_line(out.stderr, "sample")
        == "argument --seed: invalid int value: 'abc' (see ldmkit sample --help)"
    )
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected an integer >= 1"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5: expected an integer >= 1"),
        (
            "trainer.optimizer.lr=abc",
            "trainer.optimizer.lr: no such key in the config (did you mean trainer.lr?)",
        ),
        ("sampler.eta=abc", "sampler.eta='abc': expected a number (sampler=ddim)"),
        ("data.image_size=abc", "data.image_size='abc': expected an integer >= 1"),
    ],
)
def test_the_console_script_says_it_in_one_line(overrides, message, tmp_path):
    out = ldmkit("train", overrides, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 1
    assert error_line(out.stderr, "train").startswith(message)
    assert not (tmp_path / "run").exists()


def test_an_unknown_label_name_through_the_console_script(tmp_path):
    out = ldmkit(
        "sample",
        "conditioner=class_label",
        "image_size=8",
        "--labels",
        "abc",
        "--out",
        str(tmp_path / "x.png"),
        "--no-progress",
    )
    assert out.returncode == 1
    assert error_line(out.stderr, "sample").startswith(
        "--labels 'abc': unknown class name 'abc'; the classes are: T-shirt/top, Trouser,"
    )


# -- image size against the first stage's factor f, in ldmkit train ---------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [
                "stage=autoencoder",
                "trainer=autoencoder_tiny",
                "first_stage=kl_tiny",
                "image_size=18",
            ],
            "image_size=18 is not divisible by the downsample factor f=4 of first_stage=kl_tiny; "
            "use a multiple of 4 (e.g. 16 or 20)",
        ),
        (  # no multiple below it to suggest (it said "e.g. 4 or 4")
            ["stage=autoencoder", "trainer=autoencoder_tiny", "first_stage=kl_tiny", "image_size=2"],
            "image_size=2 is not divisible by the downsample factor f=4 of first_stage=kl_tiny; "
            "use a multiple of 4 (e.g. 4)",
        ),
        (
            [
                "stage=autoencoder",
                "trainer=autoencoder_tiny",
                "first_stage=kl_tiny",
                "image_size=16",
                "data.image_size=10",
            ],
            "data.image_size=10 is not divisible by the downsample factor f=4 of first_stage=kl_tiny",
        ),
        (
            ["stage=ldm", "trainer=ldm_tiny", "first_stage=kl_tiny", "image_size=30"],
            "image_size=30 is not divisible by the downsample factor f=4 of first_stage=kl_tiny",
        ),
    ],
)
def test_image_size_not_divisible_by_f_is_one_line_before_anything_is_written(
    overrides, message, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    code, line = run_main(
        capsys, "train", *overrides, f"run_dir={run_dir}", f"data.path={tmp_path / 'none'}"
    )
    assert code == 1
    assert line.startswith(message)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "overrides", [["stage=autoencoder", "trainer=autoencoder_tiny", "first_stage=kl_tiny"], ["stage=ldm", "trainer=ldm_tiny", "first_stage=kl_tiny"]]
)
def test_a_missing_dataset_is_one_line_before_the_run_folder_is_made(overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, line = run_main(capsys, "train", *overrides, f"run_dir={run_dir}", f"data.path={tmp_path / 'none'}")
    assert code == 1
    assert line.startswith(f"no prepared dataset at {tmp_path / 'none'}")
    assert not run_dir.exists()  # no half-made run folder (config.yaml, .lock) left behind


def test_a_disc_start_past_max_steps_is_said_once(tmp_path, capsys):
    """autoencoder_tiny runs 20 steps; disc_start=20 never turns the adversarial term on."""
    common = ["stage=autoencoder", "trainer=autoencoder_tiny", "first_stage=kl_tiny", "trainer.progress=true",
              f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'none'}"]  # fmt: skip
    note = "note: trainer.loss.disc_start=20 is not before trainer.max_steps=20: this run trains without"
    for start, said in (("20", True), ("19", False)):
        capsys.readouterr()
        assert main(["train", *common, f"trainer.loss.disc_start={start}"]) == 1  # then: no dataset
        assert (note.replace("=20 is", f"={start} is") in capsys.readouterr().err) is said


def test_conditioner_drop_rate_needs_no_plus_for_any_option(toy):
    """docs/plugins.md: `drop_rate` is ldmkit's key on every conditioner config, not the
    constructor's, so a plugin's option file need not list it. `conditioner.drop_rate=0.2`
    on one that does not said "no such key in the config; to add a new key, write
    +conditioner.drop_rate=0.2"."""
    from ldmkit.assembly import pipeline_parts

    cfg = compose_config([*toy, "conditioner.drop_rate=0.2"])
    assert cfg.conditioner.drop_rate == 0.2
    assert pipeline_parts(cfg)["conditioner"].drop_rate == 0.2
    with pytest.raises(Exception, match=r"conditioner.drop_rat: no such key in the config \(did you mean conditioner.drop_rate\?\)$"):
        compose_config([*toy, "conditioner.drop_rat=0.2"])


# -- first_stage.checkpoint=PATH as docs/training.md writes it ------------------------------------
def _options(group: str) -> list[str]:
    from ldmkit.config import config_dir
    from ldmkit.plugins import get_plugin_manager, root_directory

    roots = [config_dir()] + [root_directory(r) for r in get_plugin_manager().config_roots()]
    return sorted(
        {p.stem for root in roots if root is not None for p in (root / group).glob("*.yaml")}
    )


def test_component_checkpoint_needs_no_plus_for_any_option(tmp_path):
    """Every first_stage option and every experiment take `first_stage.checkpoint=PATH`
    (and `denoiser.checkpoint`, `conditioner.checkpoint`) whether or not they set the key."""
    from tests.test_all_configs import REQUIRED

    combos = [[f"first_stage={fs}"] for fs in _options("first_stage")]
    # the folder and scenes presets read the prepared data's manifest.json
    prepared = {}
    for e in _options("experiment"):
        make = REQUIRED.get(("experiment", e))
        if make is not None and make not in prepared:
            prepared[make] = make(tmp_path / make.__name__)
        combos.append([f"experiment={e}", *prepared.get(make, [])])
    for overrides in combos:
        cfg = compose_config(
            [
                *overrides,
                "first_stage.checkpoint=/weights/ae",
                "denoiser.checkpoint=/weights/unet",
                "conditioner.checkpoint=/weights/cond",
            ]
        )
        assert cfg.first_stage.checkpoint == "/weights/ae", overrides
        assert (
            cfg.denoiser.checkpoint == "/weights/unet"
            and cfg.conditioner.checkpoint == "/weights/cond"
        )
    # the command of docs/training.md, as written there
    cfg = compose_config(
        [
            "stage=ldm",
            "trainer=ldm",
            "first_stage=kl_f4_small",
            "first_stage.checkpoint=runs/fmnist_kl_f4",
            "conditioner=class_label",
            "data=fashion_mnist",
        ]
    )
    assert cfg.first_stage.checkpoint == "runs/fmnist_kl_f4"
    # and a typo in another key of the group is still caught
    with pytest.raises(Exception, match=r"first_stage.chekpoint: no such key in the config \(did you mean first_stage.checkpoint\?\)$"):
        compose_config(["first_stage=kl_f4_small", "first_stage.chekpoint=/x"])


def test_component_checkpoint_without_plus_loads_the_weights(toy, tmp_path):
    import torch

    import ldmkit

    source = ldmkit.compose(overrides=toy)
    with torch.no_grad():
        for p in source.first_stage.parameters():
            p.fill_(0.5)
    source.save(tmp_path / "pipe")
    pipe = ldmkit.compose(overrides=toy + [f"first_stage.checkpoint={tmp_path / 'pipe'}"])
    assert all(torch.all(p == 0.5) for p in pipe.first_stage.parameters())


# -- read-only and full disks -----------------------------------------------------------------
def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            "mount --bind -o ro / / 2>/dev/null || mount --bind -o ro /tmp /tmp",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


UNSHARE = _unshare_works()


@pytest.fixture
def read_only():
    """``read_only(folder)`` -> a command prefix that runs the command with ``folder``
    read-only (EROFS through a bind mount; EACCES through chmod when not root)."""
    restore = []

    def make(folder: Path) -> list[str]:
        if UNSHARE:
            script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
            return ["unshare", "-rm", "sh", "-c", script, str(folder)]
        if os.geteuid() == 0:
            pytest.skip(
                "read-only folders need `unshare -rm` (mount namespaces) when running as root"
            )
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                restore.append((path, path.stat().st_mode))
                path.chmod(0o555)
        return []

    yield make
    for path, mode in reversed(restore):
        path.chmod(mode)


def file_size_limit(limit: int):
    """A preexec_fn: writes beyond ``limit`` bytes fail with EFBIG (SIGXFSZ ignored, so the
    process gets the error instead of dying) - a full disk for every file."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


STAGE1 = [
    "stage=autoencoder",
    "first_stage=kl_tiny",
    "trainer=autoencoder_tiny",
    "data=image_folder",
    "image_size=16",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "trainer.num_threads=1",
    "trainer.tensorboard=false",
    "trainer.progress=false",
    "trainer.val_split=val",
    "trainer.val_every=0",
    "trainer.sample_every=0",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step stage-1 run with a checkpoint after each step, and its data."""
    root = tmp_path_factory.mktemp("disk")
    shards = faults.make_shards(root / "data")
    args = [*STAGE1, f"data.path={shards}", f"run_dir={root / 'run'}", "trainer.max_steps=2"]
    assert faults.train_in_process(args) == 0
    return root, args


def _copy_run(trained, tmp_path) -> tuple[Path, list[str]]:
    root, args = trained
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    return run_dir, [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={run_dir}"]


def _checkpoint_still_loads(run_dir: Path, step: int) -> None:
    from ldmkit.evaluation.autoencoder import load_first_stage
    from ldmkit.training import CheckpointManager, resolve_checkpoint

    usable = [c.step for c in CheckpointManager(run_dir / "checkpoints").usable(verify=True)]
    assert usable and max(usable) == step
    first_stage, _ = load_first_stage(resolve_checkpoint(run_dir), device="cpu")
    assert first_stage.downsample_factor == 4


@pytest.mark.slow
def test_read_only_run_dir_is_one_line_and_the_checkpoints_still_load(trained, tmp_path, read_only):
    run_dir, args = _copy_run(trained, tmp_path)
    before = digest(run_dir)
    out = ldmkit("train", *args, "trainer.max_steps=4", prefix=read_only(run_dir), cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    line = error_line(out.stderr, "train")
    assert line.startswith(f"cannot write {run_dir}/") and line.endswith(
        ("read-only file system", "permission denied")
    )
    assert digest(run_dir) == before  # nothing changed, nothing lost
    _checkpoint_still_loads(run_dir, 2)


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_checkpoints_before(trained, tmp_path):
    """The disk fills up while step 3's checkpoint is written: one line naming it, no partial
    folder left, step 2 still loads, and the same command finishes once there is room."""
    run_dir, args = _copy_run(trained, tmp_path)
    before = digest(run_dir / "checkpoints")
    model_size = (run_dir / "checkpoints" / "step_000000002" / "model.safetensors").stat().st_size
    assert (run_dir / "config.yaml").stat().st_size < model_size // 2
    out = ldmkit(
        "train",
        *args,
        "trainer.max_steps=4",
        preexec_fn=file_size_limit(model_size // 2),
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stderr
    assert error_line(out.stderr, "train") == (
        f"cannot write {run_dir}/checkpoints/step_000000003: file too large (the file size limit, `ulimit -f`, "
        "was reached); the checkpoints before it are intact (newest: step_000000002)"
    )
    assert faults.leftovers(run_dir) == []  # the partial folder went with the error
    assert digest(run_dir / "checkpoints") == before
    _checkpoint_still_loads(run_dir, 2)
    assert faults.train_in_process([*args, "trainer.max_steps=4"]) == 0  # room again: it resumes
    assert faults.checkpoint_steps(run_dir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_evaluate_to_a_read_only_or_full_output(trained, tmp_path, read_only):
    run_dir, args = _copy_run(trained, tmp_path)
    shards = next(a for a in args if a.startswith("data.path="))
    common = [
        "stage=autoencoder",
        "first_stage=kl_tiny",
        "image_size=16",
        "data=image_folder",
        shards,
        f"eval.checkpoint={run_dir}",
        "eval.split=val",
        "eval.lpips=false",
        "eval.fid_features=none",
    ]
    locked = tmp_path / "locked"
    locked.mkdir()
    out = ldmkit(
        "evaluate", *common, f"eval.output={locked / 'metrics.json'}", prefix=read_only(locked)
    )
    assert out.returncode == 1, out.stderr
    assert error_line(out.stderr, "evaluate").startswith(
        f"cannot write {locked / 'metrics.json'}: "
    )
    previous = tmp_path / "metrics.json"
    previous.write_text('{"stage": "autoencoder", "psnr": 1.0}\n')  # an earlier report
    out = ldmkit("evaluate", *common, f"eval.output={previous}", preexec_fn=file_size_limit(64))
    assert out.returncode == 1, out.stderr
    assert error_line(out.stderr, "evaluate") == (
        f"cannot write {previous}: file too large (the file size limit, `ulimit -f`, was reached)"
    )
    assert previous.read_text() == '{"stage": "autoencoder", "psnr": 1.0}\n'  # the old report is still whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sample_out_on_a_read_only_folder_fails_before_sampling(tmp_path, read_only):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = ldmkit(
        "sample",
        "sampler.steps=2",
        "image_size=8",
        "--num-samples",
        "1",
        "--out",
        str(locked / "grid.png"),
        "--no-progress",
        prefix=read_only(locked),
    )
    assert out.returncode == 1
    line = error_line(out.stderr, "sample")
    assert line.startswith(f"cannot write {locked / 'grid.png'}: ")
    assert line.endswith(("read-only file system", "permission denied"))


def test_sample_out_on_a_full_disk_keeps_the_previous_grid(tmp_path):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"the previous grid")
    out = ldmkit(
        "sample",
        "sampler.steps=2",
        "image_size=8",
        "--num-samples",
        "2",
        "--out",
        str(grid),
        "--no-progress",
        preexec_fn=file_size_limit(64),
    )
    assert out.returncode == 1
    assert error_line(out.stderr, "sample") == (
        f"cannot write {tmp_path / 'grid' / '000000.png'}: file too large (the file size limit, `ulimit -f`, was reached)"
    )
    assert grid.read_bytes() == b"the previous grid"
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary file left


def test_write_errors_name_the_path_in_process(tmp_path):
    """The same, without a subprocess: what ldmkit.io makes of a refused write."""
    import errno

    from ldmkit.io import WriteError, as_write_error, atomic_write_text

    def fail(_path):
        raise OSError(errno.ENOSPC, "No space left on device")

    from ldmkit.io import atomic_write

    with pytest.raises(WriteError) as err:
        atomic_write(tmp_path / "a.json", fail)
    assert str(err.value) == f"cannot write {tmp_path / 'a.json'}: no space left on the device"
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert list(tmp_path.iterdir()) == []
    assert as_write_error(ValueError("not a disk problem")) is None
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert as_write_error(rust, tmp_path / "m.safetensors").errno == errno.ENOSPC
    atomic_write_text(tmp_path / "ok.txt", "fine")  # an ordinary write is untouched


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_cannot_be_made_is_refused_up_front(tmp_path):
    """/proc passes the permission check (root may write there) and refuses mkdir: before,
    ``ldmkit sample --out /proc/x/o.png`` sampled, then died in mkdir with a traceback."""
    from ldmkit.io import WriteError, check_writable

    with pytest.raises(WriteError) as err:
        check_writable("/proc/ldmkit-no-such/o.png")
    assert str(err.value).startswith("cannot write /proc/ldmkit-no-such/o.png: ")
    assert str(err.value).endswith("; no folder can be made in /proc")
    check_writable(tmp_path / "a" / "b" / "o.png")  # folders that can be made: nothing made yet
    check_writable(tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteError) as err:  # was: "no space left on the device" (statvfs of /proc: 0 blocks free)
        check_writable("/proc/ldmkit-report.json")
    assert str(err.value).endswith("; no file can be made in /proc") and "space" not in str(err.value)


# -- devices, folders, sizes and files that are not what they claim (issue 26, item 5) --------
LDM_RUN = ["stage=ldm", "trainer=ldm_tiny", "image_size=8", "data=image_folder"]
SAMPLE = ["image_size=8", "sampler.steps=1"]
NO_CUDA = "CUDA is not available here|this machine has \\d+ CUDA devices?"
PICKLE_REFUSED = (
    r"cannot read checkpoint weights {root}/foreign.ckpt: it contains objects ldmkit will not "
    r"unpickle \(argparse.Namespace\): ldmkit reads only tensors and plain containers from a "
    r"pickle \(pickled code is never run\); save the state dict as .safetensors where the "
    r"checkpoint was made"
)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A file where folders go; pipeline folders whose config.yaml is broken; a pickle holding
    an object; a diffusers folder and copies of it with one number tampered with."""
    import argparse
    import json

    import torch

    import ldmkit

    root = tmp_path_factory.mktemp("bad_files")
    (root / "a_file").write_text("kept\n")
    (root / "folder.png").mkdir()  # a folder where --out's grid goes
    (root / "settings.json").mkdir()  # ... where --out settings.png's JSON goes
    ldmkit.compose(overrides=["image_size=8"]).save(root / "identity")  # first_stage=identity
    saved = (root / "identity" / "config.yaml").read_text()
    broken = {
        "not_yaml": "first_stage: [unclosed\n  x: : :\n",
        "a_list": "- first_stage\n- denoiser\n",
        "no_groups": "image_size: 8\nsampler: {name: ddim}\n",
        "bad_value": saved.replace("\nimage_size: 8\n", "\nimage_size: abc\n"),
    }
    assert broken["bad_value"] != saved
    for name, text in broken.items():
        shutil.copytree(root / "identity", root / name)
        (root / name / "config.yaml").write_text(text)
    torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "hparams": argparse.Namespace(lr=1)},
        root / "foreign.ckpt",
    )
    kl = ["first_stage=kl_tiny", "first_stage.ch=32", "first_stage.norm_groups=32", "image_size=16",
          "denoiser.use_spatial_transformer=false"]  # fmt: skip
    ldmkit.compose(overrides=kl).to_diffusers(root / "diffusers")
    tampered = {
        "huge_image": ("ldmkit.json", "image_size", 1e12),
        "negative_layers": ("unet/config.json", "layers_per_block", -1),
        "text_channels": ("vae/config.json", "block_out_channels", [32, "64", 64]),
        "no_timesteps": ("scheduler/scheduler_config.json", "num_train_timesteps", 0),
        "no_in_channels": ("unet/config.json", "in_channels", None),
    }
    for name, (file, key, value) in tampered.items():
        shutil.copytree(root / "diffusers", root / name)
        data = json.loads((root / name / file).read_text())
        data[key] = value
        (root / name / file).write_text(json.dumps(data))
    return root


# name: (argv, the one error line as a regular expression); {root}: bad_files, {tmp}: tmp_path
ONE_LINE_CASES = {
    # a device this machine does not have (with or without CUDA)
    "train-device": (
        ["train", *LDM_RUN, "trainer.device=cuda:7"],
        f"trainer.device='cuda:7': ({NO_CUDA}).*",
    ),
    "sample-device": (
        ["sample", *SAMPLE, "--device", "cuda:7"],
        f"--device 'cuda:7': ({NO_CUDA}).*",
    ),
    "demo-device": (
        ["demo", "--checkpoint", "{root}/no_such_pipeline", "--device", "cuda:7"],
        f"--device 'cuda:7': ({NO_CUDA}).*",
    ),
    # a file where a folder goes
    "run_dir-is-a-file": (
        ["train", *LDM_RUN, "run_dir={root}/a_file"],
        "run_dir={root}/a_file: {root}/a_file is a file, not a folder",
    ),
    "run_dir-under-a-file": (
        ["train", *LDM_RUN, "run_dir={root}/a_file/run"],
        "run_dir={root}/a_file/run: {root}/a_file is a file, not a folder",
    ),
    "out-under-a-file": (
        ["sample", *SAMPLE, "--out", "{root}/a_file/x.png"],
        "cannot write {root}/a_file/x.png: {root}/a_file is a file, not a folder",
    ),
    "out-samples-folder-is-a-file": (
        ["sample", *SAMPLE, "--out", "{root}/a_file.png"],
        "cannot write {root}/a_file/000000.png: {root}/a_file is a file, not a folder",
    ),
    # a folder where a file goes: refused before sampling (was a traceback after it)
    "out-is-a-folder": (
        ["sample", *SAMPLE, "--out", "{root}/folder.png"],
        "cannot write {root}/folder.png: it is a folder; name a file",
    ),
    "out-json-is-a-folder": (
        ["sample", *SAMPLE, "--out", "{root}/settings.png"],
        "cannot write {root}/settings.json: it is a folder; name a file",
    ),
    # model sizes: a level without channels, a model beyond this machine's memory
    "channel_mult-0": (
        ["train", *LDM_RUN, "denoiser.channel_mult=[1,0]"],
        r"denoiser=unet_tiny: cannot build denoiser 'unet': channel_mult=\[1, 0\]: give one multiplier >= 1 "
        r"per level \(level i has channel_mult\[i\] \* model_channels channels\)",
    ),
    "ch_mult-0": (
        [
            "train",
            "stage=autoencoder",
            "trainer=autoencoder_tiny",
            "first_stage=kl_tiny",
            "image_size=8",
            "first_stage.ch_mult=[1,0]",
        ],
        r"first_stage config: cannot build first_stage 'kl': ch_mult=\[1, 0\]: every multiplier must be >= 1.*",
    ),  # fmt: skip
    "model-beyond-memory": (
        ["sample", *SAMPLE, "denoiser.model_channels=1048576"],
        r"denoiser=unet_tiny needs 4.3 PB for its parameters and buffers \(1,063,228,105,818,115 numbers\), "
        "but .* of memory is available here",
    ),
    # a sample size whose images alone exceed any memory
    "height-beyond-memory": (
        ["sample", *SAMPLE, "--height", "100000", "--width", "100000"],
        r"sampling 16 images of 100000x100000 needs 3.8 TB, but .* of memory is available here \(estimated: "
        r"the latents and images 3.8 TB\); sample fewer images at once \(--batch-size\), decode in tiles "
        r"\(--tile\) or choose a smaller size",
    ),
    # the sampler's own steps beyond the schedule's T (was "steps must be in [1, 1000]", no key)
    "sample-steps-beyond-T": (
        ["sample", "image_size=8", "sampler=plms", "sampler.steps=2000"],
        r"sampler.steps=2000 is more than the schedule's 1000 timesteps \(schedule.timesteps\): "
        "give at most 1000",
    ),
    # the seeds the demo takes
    "seed-negative": (
        ["sample", *SAMPLE, "--seed", "-1"],
        "--seed must be a whole number from 0 to 4294967295, got -1",
    ),
    "seed-too-large": (
        ["sample", *SAMPLE, "--seed", "4294967296"],
        "--seed must be a whole number from 0 to 4294967295, got 4294967296",
    ),
    # a checkpoint folder whose config.yaml is no pipeline config
    "config-not-yaml": (
        ["sample", "--checkpoint", "{root}/not_yaml"],
        r"the checkpoint config {root}/not_yaml/config.yaml is not YAML: expected ',' or '\]', but got ':' "
        r"\(line 2, column 4\)",
    ),
    "config-a-list": (
        ["sample", "--checkpoint", "{root}/a_list"],
        "the checkpoint config {root}/a_list/config.yaml holds a list, not a mapping of config groups "
        r"\(first_stage, denoiser, conditioner, sampler\)",
    ),
    "config-without-groups": (
        ["sample", "--checkpoint", "{root}/no_groups", "sampler.steps=2"],
        "the checkpoint config {root}/no_groups/config.yaml has no first_stage, denoiser, conditioner: it "
        "does not describe a pipeline",
    ),
    "config-bad-value": (
        ["sample", "--checkpoint", "{root}/bad_value"],
        "the checkpoint config {root}/bad_value/config.yaml: image_size='abc': expected an integer >= 1 or null",
    ),
    # conversions: a first stage diffusers has no class for, tampered diffusers folders, a pickle
    "to-diffusers-identity": (
        ["convert", "to-diffusers", "{root}/identity", "--out", "{tmp}/out"],
        "the first stage 'identity' cannot be exported to diffusers, which has a counterpart for kl "
        r"\(AutoencoderKL\) and vq \(VQModel\) first stages only",
    ),
    "diffusers-image_size": (
        ["convert", "from-diffusers", "{root}/huge_image", "--out", "{tmp}/out"],
        "ldmkit.json: image_size=1000000000000.0: expected an integer >= 1",
    ),
    "diffusers-layers": (
        ["convert", "from-diffusers", "{root}/negative_layers", "--out", "{tmp}/out"],
        r"unet/config.json \(UNet2DModel\): layers_per_block=-1: expected an integer >= 1",
    ),
    "diffusers-channels": (
        ["convert", "from-diffusers", "{root}/text_channels", "--out", "{tmp}/out"],
        r"vae/config.json \(AutoencoderKL\): block_out_channels=\[32, '64', 64\]: expected a non-empty list, "
        "each an integer >= 1",
    ),
    "diffusers-timesteps": (
        ["convert", "from-diffusers", "{root}/no_timesteps", "--out", "{tmp}/out"],
        r"scheduler/scheduler_config.json \(DDIMScheduler\): num_train_timesteps=0: expected an integer >= 1",
    ),
    "diffusers-missing-key": (
        ["convert", "from-diffusers", "{root}/no_in_channels", "--out", "{tmp}/out"],
        r"unet/config.json \(UNet2DModel\): in_channels is missing",
    ),
    "compvis-pickle": (
        ["convert", "compvis", "{root}/foreign.ckpt", "--preset", "kl-f8", "--out", "{tmp}/out"],
        PICKLE_REFUSED,
    ),
}


def _filled(argv: list[str], pattern: str, root: Path, tmp: Path) -> tuple[list[str], str]:
    places = {"{root}": str(root), "{tmp}": str(tmp)}
    for key, value in places.items():
        argv = [a.replace(key, value) for a in argv]
        pattern = pattern.replace(key, re.escape(value))
    return argv, pattern


@pytest.mark.parametrize(
    ("argv", "pattern"), list(ONE_LINE_CASES.values()), ids=list(ONE_LINE_CASES)
)
def test_devices_folders_sizes_and_files_are_one_line(argv, pattern, bad_files, tmp_path, capsys):
    argv, pattern = _filled(argv, pattern, bad_files, tmp_path)
    if argv[0] == "train":
        argv += [f"data.path={tmp_path / 'none'}"] + (
            [] if any(a.startswith("run_dir=") for a in argv) else [f"run_dir={tmp_path / 'run'}"]
        )
    if argv[0] == "sample":
        argv += ["--no-progress"] + (
            [] if "--out" in argv else ["--out", str(tmp_path / "grid.png")]
        )
    code, line = run_main(capsys, *argv)
    assert code == 1
    assert re.fullmatch(pattern, line), line
    assert "weights_only" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["none"])  # nothing written
    assert (bad_files / "a_file").read_text() == "kept\n"


DATA = ["data", "prepare", "image_folder", "progress=false"]


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["out={root}/a_file"], 1, "out={root}/a_file: {root}/a_file is a file, not a folder"),
        (
            ["out={root}/a_file/data"],
            1,
            "out={root}/a_file/data: {root}/a_file is a file, not a folder",
        ),
        (["limit=-1"], 2, "limit=-1: expected an integer >= 1 or null"),
        (
            ["limit=abc", "shard_size=0"],
            2,
            "limit='abc': expected an integer >= 1 or null; shard_size=0: expected an integer >= 1 or one of auto",
        ),
        (
            ["image_size=abc"],
            2,
            "image_size='abc': expected an integer >= 1 or null (source 'image_folder')",
        ),
    ],
)
def test_data_prepare_options_are_one_line(options, code, message, bad_files, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.png").write_bytes(b"\x89PNG not really")  # never read: the options fail first
    options = [o.replace("{root}", str(bad_files)) for o in options]
    out = [] if any(o.startswith("out=") for o in options) else [f"out={tmp_path / 'data'}"]
    capsys.readouterr()
    assert main([*DATA, f"path={images}", *options, *out]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err == f"ldmkit data prepare: {message.replace('{root}', str(bad_files))}\n"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (
            ["train", *LDM_RUN, "trainer.device=cuda:7", "run_dir={tmp}/run"],
            f"trainer.device='cuda:7': ({NO_CUDA}).*",
        ),
        (
            ["sample", *SAMPLE, "--height", "100000", "--width", "100000", "--out", "{tmp}/x.png"],
            "sampling 16 images of 100000x100000 needs 3.8 TB, but .*",
        ),
        (
            [
                "convert",
                "compvis",
                "{root}/foreign.ckpt",
                "--preset",
                "kl-f8",
                "--out",
                "{tmp}/out",
            ],
            PICKLE_REFUSED,
        ),
    ],
    ids=["device", "size", "pickle"],
)
def test_the_console_script_refuses_them_in_one_line_too(argv, pattern, bad_files, tmp_path):
    argv, pattern = _filled(argv, pattern, bad_files, tmp_path)
    out = ldmkit(*argv, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert re.fullmatch(pattern, error_line(out.stderr, argv[0]))
    assert "weights_only" not in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_seeded_generators_of_many_samples_are_counted_first(monkeypatch):
    """One torch.Generator per sample (2.7 kB of state each): before, `ldmkit sample
    --num-samples 1000000000` made them before any memory check, and took all the memory of the
    machine (std::bad_alloc under a limit)."""
    import ldmkit
    from ldmkit import devices
    from ldmkit import pipeline as pipeline_module

    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "sampler.steps=1"])
    monkeypatch.setattr(devices, "available_memory", lambda device: (1_000_000, "of memory is here"))
    made = []
    monkeypatch.setattr(pipeline_module, "sample_generators", lambda seed, n: made.append(n))
    with pytest.raises(devices.InsufficientMemoryError) as err:
        pipe.sample(num_samples=1000, size=4, seed=0)
    assert str(err.value) == (
        "drawing the noise of 1000 samples (a seeded generator each) needs 2.7 MB, but 1.0 MB of memory is "
        "here; sample fewer images"
    )
    assert made == []


def test_sampling_memory_is_estimated_from_the_activations(monkeypatch):
    """Beyond the latents and images, the largest of a chunk's denoiser step and decode,
    counted on the meta device; tiles and smaller chunks shrink what is counted."""
    import ldmkit
    from ldmkit import devices

    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "sampler.steps=1"])
    pipe.eval()
    memory = {"bytes": 100_000_000}
    monkeypatch.setattr(
        devices, "available_memory", lambda device: (memory["bytes"], "of memory is here")
    )

    def refused(**kwargs) -> devices.InsufficientMemoryError:
        with pytest.raises(devices.InsufficientMemoryError) as err:
            pipe.sample(num_samples=4, size=512, seed=0, **kwargs)
        return err.value

    whole = refused()
    assert str(whole).startswith(
        "sampling 4 images of 512x512 needs 216.3 MB, but 100.0 MB of memory is here (estimated: the "
        "latents and images 13.4 MB, decoding 4 latents of 3x128x128 202.9 MB); sample fewer images "
        "at once (batch_size), decode in tiles (tile) or choose a smaller size"
    )
    memory["bytes"] = 1_000_000  # refuse them all, to compare what each needs
    assert refused(tile=16).needed < whole.needed
    chunked = refused(batch_size=1)
    assert ", 1 at a time," in str(chunked) and chunked.needed < whole.needed
    # images under 1/1024 of the memory are not estimated: sampled as before
    memory["bytes"] = 100_000_000
    assert pipe.sample(num_samples=1, size=16, seed=0).shape == (1, 3, 16, 16)


def test_a_model_beyond_memory_is_refused_before_it_is_allocated(monkeypatch):
    """The build stops at the allocation that would pass the free memory; the refusal names
    the config and what the whole model needs (counted on the meta device)."""
    from ldmkit import devices
    from ldmkit.pipeline import build_pipeline

    monkeypatch.setattr(
        devices, "available_memory", lambda device: (1_000_000, "of memory is available here")
    )
    with pytest.raises(
        devices.InsufficientMemoryError,
        match=r"^denoiser=unet_tiny needs 4\.\d MB for its parameters",
    ) as err:
        build_pipeline(compose_config(["image_size=8"]))
    assert err.value.available == 1_000_000


def test_a_gpu_index_beyond_the_machines_names_those_it_has(monkeypatch):
    """The branch CPU-only CI cannot reach: CUDA is there, the index is not."""
    import torch

    from ldmkit.devices import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda:7", "trainer.device")
    assert str(err.value) == (
        "trainer.device='cuda:7': this machine has 2 CUDA devices (cuda:0 to cuda:1)"
    )
    assert resolve_device("cuda:1", "--device") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"^--device 'gpu': expected auto or a torch device"):
        resolve_device("gpu", "--device")


def test_a_folder_made_by_another_rank_meanwhile_is_not_a_file(tmp_path, monkeypatch):
    """check_folder races rank 0 making run_dir: the folder appears between its look for a
    folder and its look for anything; that is a folder, not 'a file in the way'."""
    from pathlib import Path

    from ldmkit.io import check_folder

    run = tmp_path / "run"
    real_is_dir = Path.is_dir
    looked: list[Path] = []

    def is_dir(self):
        if self == run and not looked:  # the first look: not made yet; then rank 0 makes it
            looked.append(self)
            run.mkdir()
            return False
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    check_folder(run, "run_dir")  # no NotAFolderError
    assert looked == [run]


def test_compose_refuses_one_string_of_overrides():
    """Was "d: an override is KEY=VALUE ..." for ldmkit.compose("denoiser=unet_tiny"): the string
    read character by character."""
    from ldmkit import compose
    from ldmkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"overrides are a list of KEY=VALUE strings, e.g. \['denoiser=unet_tiny'\]"):
        compose("denoiser=unet_tiny")
