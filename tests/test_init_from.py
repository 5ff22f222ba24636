"""``trainer.init_from``: a fresh run starts from a pipeline folder, a run folder (or one of its
checkpoints), the paper's ``.ckpt`` or a diffusers folder; one report says per component what
was loaded, newly initialised and skipped; a changed class count is one error line in strict
mode and keeps the overlapping rows (and the null row) otherwise; a resumed run is bitwise the
run that was never stopped."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import yaml
from omegaconf import OmegaConf, open_dict

from ldmkit.checkpoint_layout import Checkpoint
from ldmkit.config import compose_config
from ldmkit.interop import compvis
from ldmkit.pipeline import Pipeline
from ldmkit.training import TrainingError, train
from ldmkit.training.init_from import load_components, read_source, source_config
from ldmkit.training.state import load_state
from tests.test_bad_values import error_line
from tests.test_compvis_import import LDM_CONFIG, paper_files  # noqa: F401 - a fixture
from tests.training import faults


def ldm_cfg(run_dir, *extra):
    """A seconds-long stage-2 run: identity first stage, tiny UNet, class labels (8x8)."""
    return compose_config([
        "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.embed_dim=16", "sampler=ddim", "image_size=8",
        "trainer.num_threads=1", f"run_dir={run_dir}", *extra,
    ])  # fmt: skip


def class_data(classes, size=8, n_batches=4, batch=4):
    def data(split, epoch):
        gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
        for _ in range(n_batches):
            yield {"image": torch.rand(batch, 3, size, size, generator=gen) * 2 - 1,
                   "label": torch.randint(0, classes, (batch,), generator=gen)}  # fmt: skip
    return data


def paper_cfg(run_dir, *extra):
    """The training config of the paper fixture's architecture (KL f=2, 16x16, 10 classes)."""
    model = compvis.translate_config(LDM_CONFIG)
    cfg = compose_config(["stage=ldm", "trainer=ldm_tiny", "trainer.num_threads=1", f"run_dir={run_dir}", *extra])
    with open_dict(cfg):
        for group in ("first_stage", "denoiser", "conditioner", "sampler", "schedule"):
            cfg[group] = OmegaConf.create(model.groups[group])
        cfg.image_size, cfg.scale_factor = 16, 1.0
    return cfg


def counts(stderr: str, component: str) -> tuple[int, ...]:
    """(loaded, new, skipped) of ``component`` in the init report."""
    match = re.search(rf"^  {component}: (\d+) loaded, (?:\d+ resized .*?, )?(\d+) new.*?, (\d+) skipped", stderr, re.M)
    assert match, stderr
    return tuple(int(n) for n in match.groups())


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 3-step run with 5 classes and scale_factor 0.5 (threads restored afterwards)."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("source") / "run"
    train(ldm_cfg(run, "trainer.max_steps=3", "conditioner.num_classes=5", "scale_factor=0.5"), data=class_data(5))
    torch.set_num_threads(threads)
    return run


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_pipeline_folder_a_run_and_its_checkpoint_give_the_ema_weights(source_run, tmp_path):
    expected = Pipeline.load(source_run / "pipeline").state_dict()
    for path, what in [(source_run / "pipeline", "a pipeline folder"), (source_run, "exported pipeline/"),
                       (source_run / "checkpoints" / "step_000000003", "EMA weights")]:  # fmt: skip
        source = read_source(path, stage="ldm")
        assert what in source.what and source.scale_factor == 0.5
        pipe = Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5"))
        results = load_components({k: getattr(pipe, k) for k in ("denoiser", "conditioner")}, source, strict=True)
        assert all(not r.new and not r.skipped for r in results), path
        for key, value in pipe.state_dict().items():
            if key != "scale_factor":
                assert torch.equal(value, expected[key]), (path, key)


def test_component_checkpoint_keys_take_the_same_ema_weights_as_init_from(source_run, tmp_path):
    """``denoiser.checkpoint=RUN`` (training.md's LoRA example) read the newest checkpoint's raw
    weights, where ``trainer.init_from=RUN`` and ``ldmkit sample`` take the EMA weights."""
    from ldmkit.checkpoint_layout import MODEL_FILE
    from ldmkit.safetensors_io import read_safetensors

    expected = Pipeline.load(source_run / "pipeline").state_dict()
    step = source_run / "checkpoints" / "step_000000003"
    raw = read_safetensors(step / MODEL_FILE)
    assert any(not torch.equal(raw[k], expected[k]) for k in raw if k.startswith("denoiser."))  # EMA differs
    for path in (source_run, step):
        pipe = Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5", f"denoiser.checkpoint={path}",
                                            f"conditioner.checkpoint={path}"))  # fmt: skip
        for key, value in pipe.state_dict().items():
            if key.startswith(("denoiser.", "conditioner.")):
                assert torch.equal(value, expected[key]), (path, key)


def test_the_report_counts_and_a_new_class_count_keeps_the_old_rows_and_the_null_row(source_run, tmp_path, capsys):
    before = Pipeline.load(source_run / "pipeline").conditioner.embedding.weight.detach()  # 5 classes + null
    # the conditioner frozen: its table after training is the one init_from made
    run = train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source_run}", "trainer.init_strict=false",
                        "trainer.frozen=[conditioner]", "trainer.max_steps=2"), data=class_data(10))  # fmt: skip
    err = capsys.readouterr().err
    denoiser_tensors = len(Pipeline.load(source_run / "pipeline").denoiser.state_dict())
    assert counts(err, "denoiser") == (denoiser_tensors, 0, 0)
    assert "conditioner: 0 loaded, 1 resized (embedding.weight [6, 16]->[11, 16]), 0 new, 0 skipped" in err
    assert "scale_factor: 0.5 from the source" in err and "exported pipeline/" in err
    pipe = Pipeline.load(run / "pipeline")
    table = pipe.conditioner.embedding.weight.detach()
    assert torch.equal(table[:5], before[:5]) and torch.equal(table[10], before[5])  # classes 0-4, the null row
    assert all(not torch.equal(table[i], before[j]) for i in range(5, 10) for j in range(6))  # new rows
    # drawn from the known rows' distribution: their mean, within the span of their deviations
    known = before[:5]
    deviation = table[5:10] - known.mean(0)
    basis = torch.linalg.qr((known - known.mean(0)).T).Q  # 16 x 5
    torch.testing.assert_close(deviation, deviation @ basis @ basis.T, atol=1e-5, rtol=1e-5)
    assert float(deviation.norm(dim=1).mean()) < 3 * float((known - known.mean(0)).norm(dim=1).mean())
    assert float(pipe.scale_factor) == 0.5 and pipe.config.scale_factor == 0.5
    assert OmegaConf.load(run / "config.yaml").scale_factor == 1.0  # the run's own config is as given


def test_named_classes_keep_the_row_of_their_name_and_the_report_says_so(tmp_path, capsys):
    """A folder with a new class that sorts first (ant before cat, dog) shifted every label by
    one: the new ``cat`` got the source's ``cat`` row only by index, i.e. its ``dog`` row,
    silently (the report said ``1 loaded``)."""
    names = ["cat", "dog", "emu"]
    source = train(ldm_cfg(tmp_path / "src", "trainer.max_steps=1", "conditioner.num_classes=3",
                           f"conditioner.class_names={names}"), data=class_data(3))  # fmt: skip
    before = Pipeline.load(source / "pipeline").conditioner.embedding.weight.detach()  # cat, dog, emu, null
    capsys.readouterr()
    run = train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source}", "conditioner.num_classes=3",
                        "conditioner.class_names=[ant,cat,dog]", "trainer.frozen=[conditioner]",
                        "trainer.max_steps=1"), data=class_data(3))  # fmt: skip
    err = capsys.readouterr().err
    assert ("  conditioner: 1 loaded, 0 new, 0 skipped\n    class rows matched by name (class_names differ from the "
            "source's): 2 kept (cat, dog), 2 of them under another label, 1 new (ant), 1 not in this run (emu)") in err
    table = Pipeline.load(run / "pipeline").conditioner.embedding.weight.detach()  # ant, cat, dog, null
    assert torch.equal(table[1], before[0]) and torch.equal(table[2], before[1]) and torch.equal(table[3], before[3])
    assert all(not torch.equal(table[0], before[j]) for j in range(4))  # ant: a new row
    # the same names in the same order: loaded as they are, no note
    again = train(ldm_cfg(tmp_path / "same", f"trainer.init_from={source}", "conditioner.num_classes=3",
                          f"conditioner.class_names={names}", "trainer.frozen=[conditioner]", "trainer.max_steps=1"),
                  data=class_data(3))  # fmt: skip
    assert "matched by name" not in capsys.readouterr().err
    assert torch.equal(Pipeline.load(again / "pipeline").conditioner.embedding.weight.detach(), before)


def test_scale_by_std_keeps_the_sources_factor_when_the_first_stage_is_the_sources(source_run, tmp_path, capsys):
    """A preset asking scale_by_std (experiment=folder_class, the README's LoRA example)
    estimated the factor again from one batch of the new data, so the carried denoiser (or a
    LoRA's frozen base) saw latents of another scale than it learned."""
    run = train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source_run}", "conditioner.num_classes=5",
                        "scale_factor=scale_by_std", "trainer.max_steps=1"), data=class_data(5))  # fmt: skip
    err = capsys.readouterr().err
    assert "scale_factor: 0.5 from the source, not estimated again (scale_by_std): the first stage is the source's" in err
    assert float(Pipeline.load(run / "pipeline").scale_factor) == 0.5


def test_scale_by_std_keeps_the_sources_factor_when_the_kept_first_stage_checkpoint_is_the_sources(tmp_path, capsys):
    """The README's LoRA example: experiment=folder_class keeps its own first_stage.checkpoint,
    the autoencoder the source was trained with, and scale_by_std estimated the factor again
    from one batch of data (the source's denoiser met latents of another scale). Another
    autoencoder is estimated again."""
    kl = ["first_stage=kl_tiny", "image_size=16", "conditioner.num_classes=5", "trainer.max_steps=1"]
    torch.manual_seed(0)
    for name in ("ae", "other"):  # two first stages of other weights
        Pipeline.from_config(ldm_cfg(tmp_path, *kl)).save(tmp_path / name)
    Pipeline.from_config(ldm_cfg(tmp_path, *kl, f"first_stage.checkpoint={tmp_path / 'ae'}", "scale_factor=0.5")).save(
        tmp_path / "src"
    )
    kept = {"ae": f"first_stage.checkpoint={tmp_path / 'ae'} is kept, the source's weights)",
            "other": f"first_stage.checkpoint={tmp_path / 'other'} is kept)"}  # fmt: skip
    for name, said in [("ae", "scale_factor: 0.5 from the source, not estimated again (scale_by_std)"),
                       ("other", "scale_factor: scale_by_std, estimated from the first batch (the source's 0.5 is not used)")]:  # fmt: skip
        run = train(ldm_cfg(tmp_path / f"run_{name}", *kl, f"first_stage.checkpoint={tmp_path / name}",
                            f"trainer.init_from={tmp_path / 'src'}", "scale_factor=scale_by_std"),
                    data=class_data(5, size=16))  # fmt: skip
        err = capsys.readouterr().err
        assert said in err and f"  first_stage: not loaded (its own {kept[name]}" in err, name
        assert (float(Pipeline.load(run / "pipeline").scale_factor) == 0.5) is (name == "ae")


def test_a_source_holding_none_of_the_models_tensors_is_refused(tmp_path):
    """An autoencoder run as the source of stage 2 (or the reverse) loaded nothing and trained
    from scratch, silently."""
    ae = train(compose_config(["stage=autoencoder", "trainer=autoencoder_tiny", "first_stage=kl_tiny",
                               "trainer.max_steps=1", "trainer.num_threads=1", f"run_dir={tmp_path / 'ae'}"]),
               data=class_data(5, size=16))  # fmt: skip
    with pytest.raises(TrainingError) as err:
        train(ldm_cfg(tmp_path / "run", f"trainer.init_from={ae}", "conditioner.num_classes=5"), data=class_data(5))
    assert str(err.value).startswith(f"trainer.init_from={ae} (")
    assert ("holds none of the tensors of the model built from the config (first_stage: 0 new, 152 skipped; "
            "denoiser: 208 new, 0 skipped; conditioner: 1 new, 0 skipped)" in str(err.value)
            and "is it a run of another stage, or of another architecture? (stage=ldm here;" in str(err.value))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_first_stage_the_source_cannot_fill_is_said_to_be_untrained(source_run, tmp_path):
    """The source's first stage is the identity: a KL first stage built from the config kept its
    random weights (all 'new'), and the untrained-first-stage warning was not given."""
    with pytest.warns(UserWarning, match=rf"trainer\.init_from={re.escape(str(source_run))} gives the first stage none "
                      r"of its weights \(\d+ new\): the latents come from an untrained first stage"):
        train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source_run}", "conditioner.num_classes=5",
                      "first_stage=kl_tiny", "image_size=16", "trainer.max_steps=1"), data=class_data(5, size=16))  # fmt: skip


def test_a_changed_class_count_in_strict_mode_names_the_tensor_and_both_shapes(source_run, tmp_path):
    with pytest.raises(TrainingError) as err:
        train(ldm_cfg(tmp_path / "run", f"trainer.init_from={source_run}"), data=class_data(10))
    message = str(err.value)
    assert "\n" not in message and "conditioner.embedding.weight is [6, 16] there but [11, 16]" in message
    assert "trainer.init_strict=false" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_or_unknown_source_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, problem in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "is not a source it can read")]:
        with pytest.raises(TrainingError, match=rf"trainer.init_from={path} {problem}; expected a pipeline folder"):
            read_source(path, stage="ldm")


def test_resume_of_an_init_from_run_is_bitwise_the_uninterrupted_run(source_run, tmp_path, capsys):
    args = [f"trainer.init_from={source_run}", "trainer.init_strict=false"]
    straight = train(ldm_cfg(tmp_path / "a", *args), data=class_data(10))
    train(ldm_cfg(tmp_path / "b", *args, "trainer.max_steps=3"), data=class_data(10))
    capsys.readouterr()
    resumed = train(ldm_cfg(tmp_path / "b", *args), data=class_data(10))
    assert "not applied: resuming from" in capsys.readouterr().err
    step = faults.checkpoint_steps(straight)[-1]
    assert step == 6
    assert faults.differences(faults.final_contents(straight, step), faults.final_contents(resumed, step)) == []


def test_a_paper_checkpoint_loads_through_the_importer(paper_files, tmp_path, capsys):  # noqa: F811
    ckpt, config, _ = paper_files
    with pytest.raises(TrainingError, match=r"trainer.init_config=PATH, or a stored translation as trainer.init_preset"):
        read_source(ckpt, stage="ldm")
    run = train(paper_cfg(tmp_path / "run", f"trainer.init_from={ckpt}", f"trainer.init_config={config}",
                          "trainer.max_steps=1", "trainer.frozen=[denoiser]"), data=class_data(10, size=16))  # fmt: skip
    err = capsys.readouterr().err
    imported = Pipeline.from_compvis(ckpt, config)
    for component in ("first_stage", "denoiser", "conditioner"):
        assert counts(err, component) == (len(getattr(imported, component).state_dict()), 0, 0), component
    assert "a paper checkpoint (EMA weights)" in err and "scale_factor: 0.7 from the source" in err
    trained = Pipeline.load(run / "pipeline").state_dict()
    for key, value in imported.denoiser.state_dict().items():  # frozen: what was loaded
        assert torch.equal(trained[f"denoiser.{key}"], value), key


def test_a_diffusers_folder_written_by_the_exporter_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    original = Pipeline.from_config(paper_cfg(tmp_path))
    original.to_diffusers(tmp_path / "diffusers")
    source = read_source(tmp_path / "diffusers", stage="ldm")
    assert source.what == "a diffusers folder"
    torch.manual_seed(1)
    pipe = Pipeline.from_config(paper_cfg(tmp_path))
    modules = {k: getattr(pipe, k) for k in ("first_stage", "denoiser", "conditioner")}
    results = load_components(modules, source, strict=True)
    assert all(r.loaded and not r.new and not r.skipped for r in results)
    for key, value in original.state_dict().items():
        assert torch.equal(pipe.state_dict()[key], value), key


def test_stage_one_starts_from_a_run_with_its_discriminator(tmp_path, capsys):
    def cfg(run, *extra):
        return compose_config(["stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
                               "trainer.loss.disc_start=1", "trainer.num_threads=1", "trainer.tensorboard=false",
                               "trainer.max_steps=2", "trainer.checkpoint_every=2", f"run_dir={run}", *extra])  # fmt: skip

    data = class_data(1, size=16)
    source = train(cfg(tmp_path / "a"), data=data)
    capsys.readouterr()
    train(cfg(tmp_path / "b", f"trainer.init_from={source}"), data=data)
    err = capsys.readouterr().err
    model = faults.checkpoint_contents(source / "checkpoints" / "step_000000002")
    first_stage = sum(k.startswith("model.safetensors:first_stage.") for k in model)
    loss = sum(k.startswith("training.safetensors:loss.") for k in model)
    assert "checkpoint step_000000002" in err
    assert counts(err, "first_stage") == (first_stage, 0, 0) and counts(err, "loss") == (loss, 0, 0)
    state = load_state(Checkpoint(2, tmp_path / "b" / "checkpoints" / "step_000000002"))
    assert state["step"] == 2  # a fresh step counter: 2 steps of its own


def test_ldmkit_train_prints_the_report_and_refuses_a_shape_change_in_one_line(tmp_path):
    """Through the real CLI, on real shards (3 classes), from a run of the same model."""
    shards = faults.make_shards(tmp_path / "data")
    source = tmp_path / "source"
    assert faults.train_in_process(faults.stage_args(2, shards, source, "trainer.max_steps=2")) == 0
    args = faults.stage_args(2, shards, tmp_path / "run", f"trainer.init_from={source}", "trainer.max_steps=1",
                             "conditioner.num_classes=4")  # fmt: skip
    refused = faults.run(args, cwd=tmp_path)
    assert refused.returncode == 1
    line = error_line(refused.stderr, "train")
    assert line.startswith(f"trainer.init_from={source}: conditioner.embedding.weight is [4, 16] there but [5, 16]")
    done = faults.run([*args, "trainer.init_strict=false", "trainer.trainable=[denoiser.out]"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "conditioner: 0 loaded, 1 resized (embedding.weight [4, 16]->[5, 16])" in done.stderr
    assert re.search(r"first_stage: \d+ loaded, 0 new, 0 skipped", done.stderr)
    assert re.search(r"parameters train \(0\.\d+%\)", done.stderr)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["trainer"]["init_from"] == str(source) and saved["trainer"]["init_strict"] is False


def test_init_architecture_source_takes_the_model_from_a_diffusers_folder(tmp_path, capsys):
    """The config names none of the source's architecture (the defaults: identity first stage,
    unet_tiny, no conditioner); ``trainer.init_architecture=source`` takes it from the diffusers
    folder, the overrides of keys inside its groups still apply, and every tensor loads."""
    from ldmkit.cli.common import _compose

    torch.manual_seed(0)
    original = Pipeline.from_config(paper_cfg(tmp_path))
    original.to_diffusers(tmp_path / "diffusers")
    overrides = ["stage=ldm", "trainer=ldm_tiny", "trainer.num_threads=1", "image_size=16", "trainer.max_steps=1",
                 f"run_dir={tmp_path / 'run'}", f"trainer.init_from={tmp_path / 'diffusers'}",
                 "trainer.init_architecture=source", "conditioner.drop_rate=0.25"]  # fmt: skip
    plain = compose_config(overrides[:-2])
    assert plain.denoiser.name == "unet" and plain.first_stage.name == "identity"  # not the source's
    cfg = _compose(overrides, print_config=False)
    for group in ("first_stage", "denoiser"):
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(original.config[group]), group
    assert cfg.conditioner.name == original.config.conditioner.name and cfg.conditioner.drop_rate == 0.25
    run = train(cfg, data=class_data(10, size=16))
    err = capsys.readouterr().err
    for component in ("first_stage", "denoiser", "conditioner"):
        assert counts(err, component) == (len(getattr(original, component).state_dict()), 0, 0), component
    assert Pipeline.load(run / "pipeline").config.denoiser.model_channels == original.config.denoiser.model_channels


def test_init_architecture_source_keeps_a_group_chosen_on_the_command_line(source_run, tmp_path):
    from ldmkit.cli.common import _compose

    base = ["stage=ldm", "trainer=ldm_tiny", "image_size=8", f"trainer.init_from={source_run}",
            "trainer.init_architecture=source"]  # fmt: skip
    taken = _compose([*base, "conditioner.num_classes=7"], print_config=False)
    saved = Pipeline.load(source_run / "pipeline").config
    assert taken.conditioner.name == "class_label" and taken.conditioner.num_classes == 7
    assert taken.conditioner.embed_dim == saved.conditioner.embed_dim == 16
    assert taken.denoiser.model_channels == saved.denoiser.model_channels
    chosen = _compose([*base, "conditioner=none"], print_config=False)
    assert chosen.conditioner.name == "none"
    with pytest.raises(Exception, match=r"trainer.init_architecture=source needs trainer.init_from"):
        _compose(["stage=ldm", "trainer.init_architecture=source"], print_config=False)


def test_a_paper_checkpoint_trained_with_l1_says_how_to_go_on_with_it(paper_files, tmp_path, capsys):  # noqa: F811
    """The paper's churches, semantic-synthesis, layout and inpainting models trained with
    ``loss_type: l1``; the run's own trainer.objective wins (as the schedule does), and the
    report says in one line what the paper used and how to set it."""
    ckpt, _, _ = paper_files
    paper = copy.deepcopy(LDM_CONFIG)
    paper["model"]["params"]["loss_type"] = "l1"
    (tmp_path / "l1.yaml").write_text(yaml.safe_dump(paper))
    args = [f"trainer.init_from={ckpt}", f"trainer.init_config={tmp_path / 'l1.yaml'}", "trainer.max_steps=1"]
    train(paper_cfg(tmp_path / "run", *args), data=class_data(10, size=16))
    note = [line for line in capsys.readouterr().err.splitlines() if "loss_type" in line]
    assert note == ["  trainer.objective.loss_type=l2, but the paper trained this model with l1 (its config's "
                    "loss_type): set trainer.objective.loss_type=l1 to go on as it did"]  # fmt: skip
    train(paper_cfg(tmp_path / "run_l1", *args, "trainer.objective.loss_type=l1"), data=class_data(10, size=16))
    assert "loss_type" not in capsys.readouterr().err
    assert compvis.load_preset("lsun-churches-kl8").loss_type == "l1"
    assert compvis.load_preset("cin256-v2").loss_type == "l2"
    # `ldmkit convert compvis` (Pipeline.from_compvis, saved) records it for a later init_from
    Pipeline.from_compvis(ckpt, tmp_path / "l1.yaml").save(tmp_path / "converted")
    assert read_source(tmp_path / "converted", stage="ldm").loss_type == "l1"


def test_a_new_class_count_finds_the_sources_null_row_where_its_config_puts_it(tmp_path):
    """A source whose null row is row 0 (``class_label.null_index=0``, labels 1..5) into a
    table whose null row is the last: the null row is the source's row 0, not its last class;
    labels 1-4 keep their rows; label 0 (the source's null, no class there) is a new row."""
    torch.manual_seed(0)
    Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5", "conditioner.null_index=0")).save(tmp_path / "src")
    before = Pipeline.load(tmp_path / "src").conditioner.embedding.weight.detach()
    pipe = Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=10"))
    source = read_source(tmp_path / "src", stage="ldm")
    (result,) = load_components({"conditioner": pipe.conditioner}, source, strict=False)
    assert result.resized == ["embedding.weight [6, 16]->[11, 16]"]
    table = pipe.conditioner.embedding.weight.detach()
    assert torch.equal(table[10], before[0]) and torch.equal(table[1:5], before[1:5])
    assert not any(torch.equal(table[0], row) for row in before)
    # the same class count: the same shape, the rows still move (strict mode too)
    pipe = Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5"))
    (result,) = load_components({"conditioner": pipe.conditioner}, source, strict=True)
    assert result.loaded == ["embedding.weight"]
    table = pipe.conditioner.embedding.weight.detach()
    assert torch.equal(table[5], before[0]) and torch.equal(table[1:5], before[1:5])
    assert not any(torch.equal(table[0], row) for row in before)


@pytest.mark.parametrize("text", ["denoiser: [\n", "- 1\n- 2\n"])
def test_a_source_whose_config_yaml_is_broken_is_one_line_naming_it(tmp_path, text):
    """Before: YAML that does not parse was a ParserError traceback (init_architecture=source)."""
    Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5")).save(tmp_path / "src")
    (tmp_path / "src" / "config.yaml").write_text(text)
    for read in (read_source, source_config):
        with pytest.raises(TrainingError) as err:
            read(tmp_path / "src", stage="ldm")
        assert "\n" not in str(err.value) and f"{tmp_path / 'src' / 'config.yaml'}" in str(err.value), read


def test_init_architecture_source_with_a_new_class_count_drops_the_sources_class_names(tmp_path):
    """Before: the source's 3 class_names came along with conditioner.num_classes=5 and the
    build stopped (labelled ``conditioner=none``, the config's own choice) at the names."""
    from ldmkit.cli.common import _compose

    Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=3", "conditioner.class_names=[a,b,c]")).save(
        tmp_path / "src"
    )
    base = ["stage=ldm", "trainer=ldm_tiny", "image_size=8", f"trainer.init_from={tmp_path / 'src'}",
            "trainer.init_architecture=source"]  # fmt: skip
    cfg = _compose([*base, "conditioner.num_classes=5"], print_config=False)
    assert cfg.conditioner.num_classes == 5 and cfg.conditioner.class_names is None
    assert cfg.choices.conditioner == "class_label"
    assert Pipeline.from_config(cfg).conditioner.num_classes == 5
    named = _compose([*base, "conditioner.num_classes=4", "conditioner.class_names=[w,x,y,z]"], print_config=False)
    assert list(named.conditioner.class_names) == ["w", "x", "y", "z"]
    assert list(_compose(base, print_config=False).conditioner.class_names) == ["a", "b", "c"]


def test_a_paper_translation_given_for_another_source_is_one_line(tmp_path):
    """Before: trainer.init_preset / trainer.init_config were silently ignored unless the
    source was a pickled checkpoint."""
    Pipeline.from_config(ldm_cfg(tmp_path, "conditioner.num_classes=5")).save(tmp_path / "src")
    for key, value in (("preset", "cin256-v2"), ("config", tmp_path / "config.yaml")):
        for read in (read_source, source_config):
            with pytest.raises(TrainingError, match=rf"^trainer.init_{key}={value} reads a paper \.ckpt, but "
                                                    rf"trainer.init_from={tmp_path / 'src'} is a folder"):  # fmt: skip
                read(tmp_path / "src", stage="ldm", **{key: value})
    with pytest.raises(TrainingError, match=r"^trainer.init_preset=cin256-v2 is set without trainer.init_from=PATH"):
        train(ldm_cfg(tmp_path / "run", "trainer.init_preset=cin256-v2"), data=class_data(10))


def test_init_architecture_source_resumes_without_reading_the_source_again(source_run, tmp_path, capsys):
    """Before: composing the resumed command read the source's config again, so a source moved
    or deleted since the start stopped the resume (docs: the source is not read again)."""
    import shutil

    from ldmkit.cli.common import _compose

    shutil.copytree(source_run / "pipeline", tmp_path / "src")
    args = ["stage=ldm", "trainer=ldm_tiny", "image_size=8", "trainer.num_threads=1", f"run_dir={tmp_path / 'run'}",
            f"trainer.init_from={tmp_path / 'src'}", "trainer.init_architecture=source", "trainer.init_strict=false",
            "conditioner.num_classes=7"]  # fmt: skip
    started = _compose([*args, "trainer.max_steps=1"], print_config=False)
    train(started, data=class_data(7))
    shutil.rmtree(tmp_path / "src")
    resumed = _compose([*args, "trainer.max_steps=2"], print_config=False)
    for group in ("first_stage", "denoiser", "conditioner", "schedule"):
        assert OmegaConf.to_container(resumed[group]) == OmegaConf.to_container(started[group]), group
    capsys.readouterr()
    train(resumed, data=class_data(7))
    assert "not applied: resuming from" in capsys.readouterr().err


def test_init_architecture_source_set_in_a_config_file_is_applied(source_run, tmp_path):
    """Before: only the command-line override was seen; an experiment of the user's setting
    ``trainer.init_architecture: source`` trained the config's own model."""
    from ldmkit.cli.common import _compose

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "ft.yaml").write_text(
        f"# @package _global_\ntrainer:\n  init_from: {source_run}\n  init_architecture: source\n"
    )
    cfg = _compose(["stage=ldm", "trainer=ldm_tiny", "image_size=8", "experiment=ft", "conditioner.num_classes=7"],
                   print_config=False, config_dirs=[str(tmp_path)])  # fmt: skip
    saved = Pipeline.load(source_run / "pipeline").config
    assert cfg.conditioner.name == "class_label" and cfg.conditioner.num_classes == 7
    assert cfg.denoiser.model_channels == saved.denoiser.model_channels


def test_train_takes_the_sources_architecture_from_a_config_compose_config_composed(source_run, tmp_path):
    """Before: only ``ldmkit train`` took the source's model; from Python,
    ``train(compose_config([... "trainer.init_architecture=source"]))`` trained the config's own
    (no conditioner here) silently."""
    from ldmkit.training import compose_training_config
    from ldmkit.training.init_from import adopt_source_architecture

    args = ["stage=ldm", "trainer=ldm_tiny", "image_size=8", "trainer.num_threads=1", "trainer.max_steps=1",
            f"trainer.init_from={source_run}", "trainer.init_architecture=source"]  # fmt: skip
    cfg = compose_config([*args, f"run_dir={tmp_path / 'run'}"])
    run = train(cfg, data=class_data(5))
    assert cfg.conditioner.name == "none"  # the caller's config as it was
    for saved in (Pipeline.load(run / "pipeline").config, OmegaConf.load(run / "config.yaml")):
        assert saved.conditioner.name == "class_label" and saved.conditioner.num_classes == 5
    assert OmegaConf.load(run / "config.yaml").choices.architecture == str(source_run)  # where it came from
    # ldmkit train's config (compose_training_config) is taken already: train keeps the keys set in its groups
    taken = compose_training_config([*args, "conditioner.num_classes=7"])
    assert taken.conditioner.num_classes == 7 and adopt_source_architecture(taken) is taken


@pytest.mark.parametrize(("ema", "weights"), [("enabled: false", "raw"), ("use_for_sampling: false", "raw"), ("", "EMA")])
def test_the_report_says_raw_weights_for_a_run_that_exported_no_ema(source_run, tmp_path, ema, weights):
    """Before: a run's exported pipeline/ was always reported as its EMA weights."""
    import shutil

    shutil.copytree(source_run / "pipeline", tmp_path / "run" / "pipeline")
    (tmp_path / "run" / "checkpoints").mkdir()
    config = OmegaConf.load(tmp_path / "run" / "pipeline" / "config.yaml")
    if ema:
        key, value = ema.split(": ")
        OmegaConf.update(config, f"trainer.ema.{key}", value == "true")
    OmegaConf.save(config, tmp_path / "run" / "pipeline" / "config.yaml")
    assert f"exported pipeline/ ({weights} weights, " in read_source(tmp_path / "run", stage="ldm").what
