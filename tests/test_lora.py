"""LoRA through peft (``trainer.lora``, :mod:`ldmkit.lora`): only the adapter trains, the
exported ``pipeline/`` holds it alone over a base it names by path and hash, ``Pipeline.load``
and ``ldmkit sample`` attach it, ``ldmkit lora merge`` bakes it in, and diffusers loads
``ldmkit lora export-diffusers``'s file onto the exported base UNet and samples the same
latents."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from ldmkit import lora
from ldmkit.config import compose_config
from ldmkit.interop.diffusers_format import ConversionError
from ldmkit.pipeline import Pipeline
from ldmkit.safetensors_io import read_safetensors
from ldmkit.training import CheckpointManager, train
from ldmkit.training.ldm import LDMTrainer
from tests.conftest import ldmkit_cli
from tests.test_bad_values import error_line

BASE = ["stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
        "conditioner=class_label", "conditioner.num_classes=3", "sampler=ddim", "image_size=8"]  # fmt: skip


def cfg(run_dir, *extra, start=None):
    """A LoRA run; from the weights of the run ``start`` (an untrained UNet's transformers
    add nothing: their proj_out starts at zero, so their attention gets no gradient)."""
    weights = [f"denoiser.checkpoint={start}", f"conditioner.checkpoint={start}"] if start else []
    return compose_config([*BASE, f"run_dir={run_dir}", "trainer.lora.rank=4", "trainer.lr=1e-2", *weights, *extra])
# (precision="fp32" where outputs are compared: `auto` is bf16 on CPUs with AVX512-BF16)


def labels(split, epoch):
    gen = torch.Generator().manual_seed(100 * epoch + (split == "train"))
    for _ in range(4):
        yield {"image": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1,
               "label": torch.randint(0, 3, (4,), generator=gen)}  # fmt: skip


def checkpoint_weights(run, step=None):
    checkpoints = CheckpointManager(run / "checkpoints")
    chosen = checkpoints.latest() if step is None else next(c for c in checkpoints.list() if c.step == step)
    return read_safetensors(chosen.model_file)


def base_name(key):
    return key.replace(".base_layer.", ".")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A plain 6-step run: the base the LoRA runs start from."""
    return train(cfg(tmp_path_factory.mktemp("plain") / "run", "trainer.lora.rank=0", "trainer.lr=1e-3"), data=labels)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, trained):
    trainer = LDMTrainer(cfg(tmp_path_factory.mktemp("lora") / "run", start=trained), data=labels)
    return trainer, trainer.fit()


def test_only_the_adapter_trains_and_the_base_stays_bit_identical(lora_run):
    trainer, run = lora_run
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    names = {name for name, p in trainer.pipeline.named_parameters() if id(p) in optimized}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n for n, p in trainer.pipeline.named_parameters() if p.requires_grad} == names
    assert set(trainer.ema.names) == names  # the EMA tracks the adapter alone
    adapted = {k for k in trainer.lora.targets["denoiser"]}
    assert any("attn1.to_q" in k for k in adapted) and any("attn2.to_out.0" in k for k in adapted)

    first, last = checkpoint_weights(run, 3), checkpoint_weights(run, 6)
    base = read_safetensors(run / "base" / "model.safetensors")
    frozen_keys = [k for k in last if ".lora_" not in k]
    assert {base_name(k) for k in frozen_keys} == set(base) - {"scale_factor"}  # a buffer of the pipeline
    for key in frozen_keys:  # the base never moved
        assert torch.equal(first[key], last[key]) and torch.equal(last[key], base[base_name(key)]), key
    lora_b = [k for k in last if ".lora_B." in k]
    assert lora_b and all(not torch.equal(first[k], last[k]) for k in lora_b)  # the adapter did


def test_the_exported_pipeline_is_the_adapter_alone_and_loads_as_trained(lora_run):
    trainer, run = lora_run
    folder = run / "pipeline"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors", "config.yaml"]
    record = json.loads((folder / "adapter.json").read_text())
    assert record["base"]["path"] == "../base" and record["lora"]["rank"] == 4 and record["lora"]["alpha"] == 4.0
    stored = read_safetensors(folder / "adapter.safetensors")
    assert (folder / "adapter.safetensors").stat().st_size < (run / "base" / "model.safetensors").stat().st_size / 10
    with trainer._sampling_weights():  # the EMA weights, as every pipeline export
        expected = {k: v.clone() for k, v in lora.adapter_state(trainer.pipeline).items()}
        z, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 600])
        cond = trainer.pipeline.conditioner({"label": [0, 2]})
        want = trainer.pipeline.denoiser(z, t, cond)
    assert stored.keys() == expected.keys()
    for key in stored:
        assert torch.equal(stored[key], expected[key]), key

    loaded = Pipeline.load(folder)
    assert lora.has_adapters(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(z, t, loaded.conditioner({"label": [0, 2]})), want, rtol=0, atol=1e-6)
        plain = Pipeline.load(run / "base")  # the adapter changes what the model does
        assert (plain.denoiser(z, t, cond) - want).abs().max() > 1e-5
    with pytest.raises(Exception, match="carries a LoRA adapter"):
        loaded.save(run / "nowhere")


def test_merge_cli_bakes_the_adapter_in(lora_run, tmp_path):
    _, run = lora_run
    out = tmp_path / "merged"
    result = ldmkit_cli("lora", "merge", str(run / "pipeline"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "LoRA layers merged" in result.stdout
    merged, adapted = Pipeline.load(out), Pipeline.load(run / "pipeline")
    assert not lora.has_adapters(merged) and not (out / "adapter.json").exists()
    z, t = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 500, 999])
    cond = adapted.conditioner({"label": [0, 1, 2]})
    with torch.no_grad():
        torch.testing.assert_close(merged.denoiser(z, t, cond), adapted.denoiser(z, t, cond), rtol=0, atol=1e-5)
    a, b = (p.sample({"label": [0, 1, 2]}, steps=4, seed=3, guidance_scale=2.0, return_latents=True,
                     precision="fp32") for p in (merged, adapted))  # fmt: skip
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_init_from_a_lora_run_starts_from_the_merged_weights(lora_run):
    """A LoRA run (its adapter-only pipeline/, or one of its checkpoints: base + adapter under
    peft's names) is a source like any run: the adapter baked into its base, every tensor
    loaded, none re-initialised."""
    from ldmkit.training.init_from import load_components, read_source

    _, run = lora_run
    merged = Pipeline.load(run / "pipeline")
    lora.merge(merged)
    checkpoint = CheckpointManager(run / "checkpoints").latest().path
    for path in (run, run / "pipeline", checkpoint):
        source = read_source(path, stage="ldm")
        assert "LoRA adapter merged" in source.what, path
        pipe = Pipeline.from_config(cfg(run, "trainer.lora.rank=0"))
        results = load_components({"denoiser": pipe.denoiser, "conditioner": pipe.conditioner}, source, strict=True)
        assert all(r.loaded and not r.new and not r.skipped for r in results), (path, [r.line() for r in results])
        for key, value in pipe.denoiser.state_dict().items():  # pipeline/ and the checkpoint: the EMA weights
            assert torch.equal(value, merged.denoiser.state_dict()[key]), (path, key)


def test_what_is_not_an_adapter_folder_is_named_with_where_the_adapter_is(lora_run, tmp_path):
    """A missing path, the adapter.json file and the LoRA run folder were all 'not a LoRA adapter
    folder (no adapter.json)'; sampling a LoRA run folder gave no hint to its pipeline/."""
    from ldmkit.pipeline import Pipeline

    _, run = lora_run
    cases = {
        tmp_path / "nope": f"{tmp_path / 'nope'} does not exist (give the adapter folder a LoRA run exports: RUN/pipeline)",
        run / "pipeline" / "adapter.json": f"{run / 'pipeline' / 'adapter.json'} is a file, not a LoRA adapter folder: "
                                           f"give its folder, {run / 'pipeline'}",
        run: f"{run} is a training run: its adapter is {run / 'pipeline'}",
        run / "base": f"{run / 'base'} is not a LoRA adapter folder (no adapter.json)",
    }  # fmt: skip
    for action in ("merge", "export-diffusers"):
        for path, said in cases.items():
            result = ldmkit_cli("lora", action, str(path), "--out", str(tmp_path / "out"))
            assert result.returncode == 1 and error_line(result.stderr, "lora") == said, result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match=rf"is a training run: its pipeline is {re.escape(str(run / 'pipeline'))}$"):
        Pipeline.load(run)


def test_merge_refuses_to_write_over_its_own_base_or_adapter(lora_run, tmp_path):
    _, run = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    before = {p: p.read_bytes() for p in [*(copy / "base").iterdir(), *(copy / "pipeline").iterdir()]}
    for out in (copy / "base", copy / "pipeline"):
        result = ldmkit_cli("lora", "merge", str(copy / "pipeline"), "--out", str(out))
        assert result.returncode == 1, result.stdout
        assert error_line(result.stderr, "lora").startswith(f"--out {out} is the adapter's"), result.stderr
    assert {p: p.read_bytes() for p in before} == before and sorted(copy.joinpath("base").iterdir()) == sorted(
        p for p in before if p.parent.name == "base")
    assert not (copy / "pipeline" / "model.safetensors").exists()


def test_a_moved_or_changed_base_is_one_line_naming_the_file(lora_run, tmp_path):
    _, run = lora_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    assert lora.has_adapters(Pipeline.load(copy / "pipeline"))  # a run folder moves whole
    shutil.move(copy / "base", tmp_path / "elsewhere")
    sample = ["sample", "--checkpoint", str(copy / "pipeline"), "--labels", "0", "--out", str(tmp_path / "x.png"),
              "sampler.steps=1"]  # fmt: skip
    result = ldmkit_cli(*sample)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"ldmkit sample: error: {copy / 'pipeline' / 'adapter.json'}: its base pipeline "
        f"{copy / 'pipeline' / '..' / 'base'} is missing (moved or deleted?); put it back, or write its new "
        "place into base.path of that file"
    )
    record = json.loads((copy / "pipeline" / "adapter.json").read_text())
    record["base"]["path"] = str(tmp_path / "elsewhere")
    (copy / "pipeline" / "adapter.json").write_text(json.dumps(record))
    assert lora.has_adapters(Pipeline.load(copy / "pipeline"))  # found again, hash checked
    weights = read_safetensors(tmp_path / "elsewhere" / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "elsewhere" / "model.safetensors"))
    result = ldmkit_cli(*sample)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ldmkit sample: error: {copy / 'pipeline' / 'adapter.json'}: the base pipeline {tmp_path / 'elsewhere'} "
        "changed since the adapter was trained on it"
    )


def test_resume_of_a_lora_run_is_exact(tmp_path, trained):
    straight = train(cfg(tmp_path / "a", start=trained), data=labels)
    train(cfg(tmp_path / "b", "trainer.max_steps=3", start=trained), data=labels)
    resumed = train(cfg(tmp_path / "b", start=trained), data=labels)
    a, b = checkpoint_weights(straight), checkpoint_weights(resumed)
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("pipeline/adapter.safetensors", "base/model.safetensors"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_targets_and_conditioner(tmp_path):
    from ldmkit.pipeline import build_pipeline

    pipeline = build_pipeline(cfg(tmp_path))
    adapter = lora.from_options(pipeline, {"rank": 2, "targets": ["denoiser.*.attn2.to_k"], "conditioner": True})
    assert adapter.alpha == 2.0 and all(n.endswith("attn2.to_k") for n in adapter.targets["denoiser"])
    assert adapter.targets["conditioner"] == ["embedding"]  # the class embedding: peft's Embedding LoRA
    lora.add_lora(pipeline, adapter)
    assert {n for n, p in pipeline.named_parameters() if p.requires_grad} == set(lora.adapter_state(pipeline))
    assert any(n.startswith("conditioner.embedding.lora_embedding_A") for n in lora.adapter_state(pipeline))
    with pytest.raises(lora.LoraError, match=r"trainer.lora.targets: 'denoiser.\*.attn9' matches no linear"):
        lora.from_options(build_pipeline(cfg(tmp_path)), {"rank": 2, "targets": ["denoiser.*.attn9"]})
    assert lora.from_options(pipeline, {"rank": 0}) is None


def test_bad_lora_values_are_one_line(tmp_path):
    result = ldmkit_cli("train", *BASE, "trainer.lora.rank=-1", f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0 and "trainer.lora.rank" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_then_sample_through_the_cli(tmp_path):
    from tests.training.faults import make_shards

    shards = make_shards(tmp_path / "data")
    run = tmp_path / "run"
    result = ldmkit_cli(
        "train", *[a for a in BASE if not a.startswith("image_size")], "image_size=16", "data=image_folder",
        f"data.path={shards}", f"run_dir={run}", "trainer.lora.rank=4", "trainer.max_steps=3",
        "trainer.num_workers=0", "trainer.val_split=val", "trainer.sample_every=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "LoRA: " in result.stderr and "trainable parameters" in result.stderr
    assert (run / "pipeline" / "adapter.safetensors").is_file() and not (run / "pipeline" / "model.safetensors").exists()
    out = tmp_path / "grid.png"
    result = ldmkit_cli("sample", "--checkpoint", str(run / "pipeline"), "--labels", "0,2", "--out", str(out),
                        "sampler.steps=2", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


# -- diffusers -------------------------------------------------------------------------------


def test_diffusers_loads_the_exported_adapter_and_samples_the_same_latents(tmp_path):
    """The base goes out with Pipeline.to_diffusers, the adapter with ``ldmkit lora
    export-diffusers``; diffusers' UNet2DConditionModel.load_lora_adapter takes it and a DDIM
    loop through diffusers' scheduler lands where ldmkit's sampler does (as in
    test_diffusers_interop)."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    config = compose_config([*BASE[:2], "first_stage=kl_tiny", "first_stage.ch=32", "first_stage.norm_groups=32",
                             *BASE[3:-1], "image_size=16", "sampler.spacing=paper", f"run_dir={tmp_path}"])  # fmt: skip
    pipe = Pipeline.from_config(config)
    with torch.no_grad():  # nothing at its initial value (zero output convolutions)
        gen = torch.Generator().manual_seed(5)
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pipe.save(tmp_path / "base")
    adapter = lora.from_options(pipe, {"rank": 4, "alpha": 8})
    lora.add_lora(pipe, adapter)
    with torch.no_grad():  # B starts at zero: give the adapter something to say
        gen = torch.Generator().manual_seed(1)
        for name, p in pipe.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    lora.save_base(pipe, adapter, [], tmp_path / "base")
    lora.save_adapter(pipe, tmp_path / "adapter", adapter)
    assert adapter.base == (tmp_path / "base").resolve()  # found, not rewritten

    base = Pipeline.load(tmp_path / "base")
    base.to_diffusers(tmp_path / "hf")
    result = ldmkit_cli("lora", "export-diffusers", str(tmp_path / "adapter"), "--out", str(tmp_path / "hf_lora"))
    assert result.returncode == 0, result.stderr
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "hf" / "unet")
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    adapted = Pipeline.load(tmp_path / "adapter")
    cond = adapted.conditioner({"label": [0, 2]})
    with torch.no_grad():
        without = unet(z, t, cond["crossattn"]).sample
        unet.load_lora_adapter(str(tmp_path / "hf_lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        theirs = unet(z, t, cond["crossattn"]).sample
        ours = adapted.denoiser(z, t, cond)
    assert (without - ours).abs().max() > 1e-2  # the adapter reached diffusers' UNet
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    scheduler = DDIMScheduler.from_pretrained(tmp_path / "hf" / "scheduler")
    scheduler.set_timesteps(20)
    x = z.clone()
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step, cond["crossattn"]).sample, step, x).prev_sample
    mine = adapted.sample({"label": [0, 2]}, noise=z, steps=20, return_latents=True, precision="fp32")
    torch.testing.assert_close(mine, x, rtol=1e-3, atol=1e-3)
    with pytest.raises(ConversionError, match="carries a LoRA adapter: export its base and the adapter apart"):
        adapted.to_diffusers(tmp_path / "whole")


def test_an_adapter_on_the_conditioner_is_refused_by_the_diffusers_export(tmp_path):
    from ldmkit.pipeline import build_pipeline

    pipe = build_pipeline(cfg(tmp_path / "r"))
    pipe.save(tmp_path / "base")
    adapter = lora.from_options(pipe, {"rank": 2, "conditioner": True})
    lora.add_lora(pipe, adapter)
    lora.save_base(pipe, adapter, [], tmp_path / "base")
    lora.save_adapter(pipe, tmp_path / "adapter", adapter)
    result = ldmkit_cli("lora", "export-diffusers", str(tmp_path / "adapter"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "also adapts the conditioner" in result.stderr.strip().splitlines()[-1]
