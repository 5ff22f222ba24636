"""`evaluate stage=autoencoder` end to end on a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.config import compose_config
from ldmkit.evaluation import evaluate
from ldmkit.evaluation.classifier import FashionMNISTClassifier
from ldmkit.evaluation.features import INCEPTION_FILE, build_feature_extractor
from ldmkit.evaluation.metrics import psnr
from ldmkit.losses import MissingWeightsError
from ldmkit.training import train


@pytest.fixture
def empty_hub(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(before)


def _data(n=24, seed=0):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return images, (lambda split, epoch: [{"image": images[i : i + 8]} for i in range(0, n, 8)])


@pytest.fixture
def trained_run(tmp_path):
    _, data = _data()
    cfg = compose_config(["stage=autoencoder", "first_stage=kl_tiny", "first_stage.encode_mode=mode",
                          "trainer=autoencoder_tiny", "trainer.max_steps=10", "trainer.tensorboard=false",
                          "trainer.num_threads=1", f"run_dir={tmp_path / 'run'}"])
    threads = torch.get_num_threads()
    yield train(cfg, data=data)
    torch.set_num_threads(threads)


def _classifier(path: Path) -> Path:
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in FashionMNISTClassifier().state_dict().items()}
    save_file(state, str(path))
    return path


def test_report_has_metrics_and_is_written(trained_run, tmp_path, empty_hub):
    from ldmkit.evaluation.autoencoder import load_first_stage
    from ldmkit.training import resolve_checkpoint

    images, data = _data()
    classifier = _classifier(tmp_path / "clf.safetensors")
    cfg = compose_config(["stage=autoencoder", f"run_dir={trained_run}",
                          f"eval.feature_checkpoint={classifier}"])
    report = evaluate(cfg, data=data)
    assert report["step"] == 10 and report["num_images"] == 24 and report["split"] == "test"
    # PSNR recomputed from the checkpoint directly
    model, _ = load_first_stage(resolve_checkpoint(trained_run), device=torch.device("cpu"))
    with torch.no_grad():
        rec = model.decode(model.encode(images)).clamp(-1, 1)
    expected = psnr((rec + 1) / 2, (images + 1) / 2).mean()
    assert report["psnr"] == pytest.approx(float(expected), rel=1e-5)
    assert 0 < report["ssim"] <= 1
    assert report["lpips"] is None and "vgg16-397923af.pth" in report["skipped"]["lpips"]
    assert report["frechet_features"] == "fashion_mnist" and report["frechet_distance"] >= 0
    assert isinstance(report["kid"], float) and report["kid_std"] > 0  # 100 subsets of the 24
    written = json.loads(Path(report["output"]).read_text())
    assert written["psnr"] == report["psnr"]
    assert Path(report["output"]).parent == trained_run / "eval"


def test_missing_feature_weights(trained_run, tmp_path, empty_hub):
    _, data = _data()
    cfg = compose_config(["stage=autoencoder", f"run_dir={trained_run}",
                          f"eval.feature_checkpoint={tmp_path / 'none.safetensors'}",
                          f"eval.output={tmp_path / 'r.json'}"])
    report = evaluate(cfg, data=data)  # auto: skipped, with the reason
    assert report["frechet_distance"] is None and report["kid"] is None
    assert report["skipped"]["kid"] == report["skipped"]["frechet_distance"]
    assert INCEPTION_FILE in report["skipped"]["frechet_distance"]
    assert "none.safetensors" in report["skipped"]["frechet_distance"]
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        build_feature_extractor("inception")
    strict = compose_config(["stage=autoencoder", f"run_dir={trained_run}", "eval.lpips=true"])
    with pytest.raises(MissingWeightsError, match="eval.lpips=false"):
        evaluate(strict, data=data)
    with pytest.raises(ValueError, match="unknown eval option"):
        evaluate(compose_config(["stage=autoencoder", f"run_dir={trained_run}", "+eval.psnr=1"]), data=data)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST IDX files not installed")
def test_classifier_training_writes_a_loadable_model(tmp_path):
    from ldmkit.evaluation.classifier import load_classifier, train_fashion_mnist_classifier

    summary = train_fashion_mnist_classifier(tmp_path / "c.safetensors", epochs=1, limit=512,
                                             batch_size=64, progress=False)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    model = load_classifier(tmp_path / "c.safetensors")
    assert model.features(torch.zeros(2, 3, 28, 28)).shape == (2, 128)


def test_a_sampling_first_stage_scores_the_same_twice(tmp_path):
    # encode_mode=sample draws posterior noise: evaluate seeds it from `seed` (it drew from
    # whatever the global generator held, so two evaluations disagreed)
    _, data = _data()
    run = train(compose_config(["stage=autoencoder", "first_stage=kl_tiny", "trainer=autoencoder_tiny",
                                "trainer.max_steps=2", "trainer.tensorboard=false", "trainer.num_threads=1",
                                f"run_dir={tmp_path / 'run'}"]), data=data)

    def scored(seed):
        cfg = compose_config(["stage=autoencoder", f"run_dir={run}", "eval.fid_features=none",
                              "eval.lpips=false", f"seed={seed}"])
        return evaluate(cfg, data=data, write=False)["psnr"]

    torch.manual_seed(1)
    first = scored(0)
    torch.manual_seed(2)
    assert scored(0) == first
    assert scored(3) != first  # the noise is the seed's


def test_images_smaller_than_the_ssim_window_skip_ssim_with_the_reason(trained_run, tmp_path):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = compose_config(["stage=autoencoder", f"run_dir={trained_run}", "eval.fid_features=none",
                          "eval.lpips=false", f"eval.output={tmp_path / 'r.json'}"])
    report = evaluate(cfg, data=lambda split, epoch: [{"image": images}])
    assert report["num_images"] == 4 and report["psnr"] > 0  # PSNR is still scored
    assert report["ssim"] is None and report["ssim_std"] is None
    assert report["skipped"]["ssim"] == "SSIM's 11x11 window does not fit the 8x8 images"


def test_an_image_size_the_checkpoints_f_does_not_divide_is_one_line(trained_run, tmp_path):
    from tests.test_cli import ldmkit

    out = ldmkit("evaluate", "stage=autoencoder", f"run_dir={trained_run}", "image_size=18")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "ldmkit evaluate: error: image_size=18 is not divisible by the downsample factor f=4 of the "
        f"first stage of {trained_run / 'checkpoints' / 'step_000000010'}; use a multiple of 4 (e.g. 16 or 20)"
    ]


def test_an_output_path_that_is_a_folder_fails_before_the_evaluation(trained_run, tmp_path):
    from ldmkit.io import WriteError

    folder = tmp_path / "reports"
    folder.mkdir()
    cfg = compose_config(["stage=autoencoder", f"run_dir={trained_run}", f"eval.output={folder}"])
    with pytest.raises(WriteError, match=f"cannot write {folder}: it is a folder; name a file"):
        evaluate(cfg, data=lambda split, epoch: pytest.fail("evaluated before refusing eval.output"))
    assert folder.is_dir() and not any(folder.iterdir())


def test_missing_data_names_the_data_the_run_was_trained_on(tmp_path, monkeypatch):
    """Before: a run trained on ``data=image_folder data.path=...`` evaluated with only its
    run_dir said ``no prepared dataset at data/fashion_mnist`` (the default data) and no more."""
    from ldmkit.data.errors import SourceNotFoundError

    _, data = _data()
    monkeypatch.chdir(tmp_path)  # no data/ here
    cfg = compose_config(["stage=autoencoder", "first_stage=kl_tiny", "first_stage.encode_mode=mode",
                          "data=image_folder", f"data.path={tmp_path / 'photos'}", "trainer=autoencoder_tiny",
                          "trainer.max_steps=2", "trainer.tensorboard=false", "trainer.num_threads=1",
                          f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    threads = torch.get_num_threads()
    try:
        run = train(cfg, data=data)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(SourceNotFoundError) as err:
        evaluate(compose_config(["stage=autoencoder", f"run_dir={run}"]))
    assert str(err.value).endswith(
        f"; the run was trained on data=image_folder data.path={tmp_path / 'photos'}: evaluate reads the "
        "data its command line gives, so repeat the run's data overrides (or its experiment=)"
    )
    assert str(err.value).startswith(f"no prepared dataset at {tmp_path / 'data' / 'fashion_mnist'}")


def test_an_ldm_run_is_scored_by_its_first_stage_and_the_report_says_so(trained_run, tmp_path):
    """Before: `evaluate stage=autoencoder run_dir=<an LDM run>` scored the first stage quietly."""
    images, data = _data()
    ldm_run = tmp_path / "ldm"
    cfg = compose_config(["stage=ldm", "trainer=ldm_tiny", "trainer.max_steps=1", "trainer.num_threads=1",
                          "first_stage=kl_tiny", "first_stage.encode_mode=mode", f"first_stage.checkpoint={trained_run}",
                          "denoiser=unet_tiny",
                          "image_size=16", f"run_dir={ldm_run}"])
    threads = torch.get_num_threads()
    train(cfg, data=data)
    torch.set_num_threads(threads)
    options = ["eval.fid_features=none", "eval.lpips=false", f"eval.output={tmp_path / 'r.json'}"]
    on_ldm = evaluate(compose_config(["stage=autoencoder", f"run_dir={ldm_run}", *options]), data=data)
    on_first = evaluate(compose_config(["stage=autoencoder", f"run_dir={trained_run}", *options]), data=data)
    assert on_ldm["psnr"] == on_first["psnr"]  # the same weights scored
    assert on_ldm["note"] == (f"{ldm_run / 'checkpoints' / 'step_000000001'} is a ldm run: this scores its first "
                              f"stage (trained in {trained_run}), not its samples")
    assert "note" not in on_first



def test_the_default_split_is_the_datas_held_out_one(trained_run, tmp_path):
    """eval.split=auto (the default) reads the data's val split, else its test split, as
    trainer.val_split does; it read `test` and stopped on data prepared with a val split only."""
    from ldmkit.data import prepare
    from tests.data.conftest import make_image_folder

    make_image_folder(tmp_path / "photos", per_class=4, size=(16, 16))
    out = tmp_path / "shards"
    prepare("image_folder", out, path=str(tmp_path / "photos"), val_fraction=0.25, progress=False)
    options = [f"run_dir={trained_run}", "data=image_folder", f"data.path={out}", "image_size=16",
               "eval.fid_features=none", "eval.lpips=false", f"eval.output={tmp_path / 'r.json'}"]  # fmt: skip
    report = evaluate(compose_config(["stage=autoencoder", *options]))
    assert report["split"] == "val" and report["num_images"] == 3  # a quarter of the 12 images
    assert evaluate(compose_config(["stage=autoencoder", *options, "eval.split=train"]))["num_images"] == 9


def test_data_without_a_held_out_split_is_one_line_for_auto(trained_run, tmp_path):
    from ldmkit.config import ConfigError
    from ldmkit.data import prepare
    from tests.data.conftest import make_image_folder

    make_image_folder(tmp_path / "photos", per_class=2, size=(16, 16))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "photos"), progress=False)  # train only
    cfg = compose_config(["stage=autoencoder", f"run_dir={trained_run}", "data=image_folder",
                          f"data.path={tmp_path / 'shards'}", "image_size=16"])
    with pytest.raises(ConfigError, match=r"^eval\.split is auto: the data has no held-out split \(val or test\)"):
        evaluate(cfg)
