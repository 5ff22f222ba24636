"""`evaluate stage=ldm`: the samples' Fréchet distance, KID and class accuracy, checked against
a second computation (scipy's matrix square root, the classifier run by hand) on stand-in
pipelines whose samples are known, and end to end on a tiny trained run (Python and CLI)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from ldmkit.config import compose_config
from ldmkit.data.sources.fashion_mnist import CLASSES
from ldmkit.evaluation import evaluate
from ldmkit.evaluation.classifier import FashionMNISTClassifier
from ldmkit.evaluation.features import FashionMNISTFeatures
from ldmkit.evaluation.ldm import sample_metrics
from tests.conftest import run_ldmkit

N, SIZE = 24, 16


def ldmkit(*args: str):
    return run_ldmkit(args, dict(os.environ), timeout=300)


def _classifier(path: Path) -> Path:
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in FashionMNISTClassifier().state_dict().items()}, str(path))
    return path


def _real(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1, torch.arange(n) % 10


def _batches(images, labels, per=8):
    return [{"image": images[i : i + per], "label": labels[i : i + per]} for i in range(0, len(images), per)]


class _Conditioner:
    def __init__(self, keys=("label",)):
        self.input_keys = tuple(keys)

    def input_kind(self, key):
        return "class"

    def training_inputs(self, batch, generator=None):
        return batch


class _StandIn:
    """A pipeline whose samples are given: ``answer(call_index, cond, n)`` -> images."""

    def __init__(self, answer, keys=("label",)):
        self.answer, self.calls = answer, []
        self.conditioner = _Conditioner(keys)
        self.first_stage = SimpleNamespace(image_channels=1)

    def sample(self, cond, **kw):
        self.calls.append((cond, kw))
        n = kw["num_samples"] if cond is None else len(next(iter(cond.values())))
        return self.answer(len(self.calls) - 1, cond, n)


def _fid_by_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return FashionMNISTFeatures(_classifier(tmp_path_factory.mktemp("clf") / "clf.safetensors")).eval()


def test_samples_that_are_the_real_images_score_zero_and_the_classifiers_own_accuracy(features):
    images, labels = _real()
    batches = _batches(images, labels)
    pipe = _StandIn(lambda i, cond, n: batches[i]["image"])
    result = sample_metrics(pipe, batches, device=torch.device("cpu"), feature_model=features, seed=7, steps=3)
    assert result["num_images"] == N
    assert result["frechet_distance"] == pytest.approx(0.0, abs=1e-3)
    with torch.no_grad():
        expected = float((features.model(images).argmax(1) == labels).float().mean())
    assert result["class_accuracy"] == pytest.approx(expected) and result["class_accuracy_key"] == "label"
    # each batch's own labels are the conditions; sample k of the split is drawn from seed + k
    for (cond, kw), batch, before in zip(pipe.calls, batches, (0, 8, 16), strict=True):
        assert torch.equal(cond["label"], batch["label"]) and kw["num_samples"] is None
        assert kw["seed"] == 7 + before and kw["size"] == (SIZE, SIZE) and kw["steps"] == 3


# the random classifier's dead ReLU features make both covariances singular; sqrtm still agrees
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_the_frechet_distance_is_scipys_on_the_same_features(features):
    images, labels = _real(n=320)  # more images than the 128 features: full-rank covariances
    other, _ = _real(n=320, seed=1)
    fake = (other * 0.5 + 0.3).clamp(-1, 1)  # another distribution
    batches = _batches(images, labels, per=64)
    pipe = _StandIn(lambda i, cond, n: fake[64 * i : 64 * i + n])
    result = sample_metrics(pipe, batches, device=torch.device("cpu"), feature_model=features)
    with torch.no_grad():
        a, b = features(images).double().numpy(), features(fake).double().numpy()
    expected = _fid_by_scipy(a, b)
    assert expected > 0.01  # the check can fail: the two sets differ
    assert result["frechet_distance"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert result["kid"] is not None


def test_a_wrong_class_for_every_sample_scores_zero_accuracy(features):
    images, labels = _real()
    with torch.no_grad():
        predicted = features.model(images).argmax(1)
    batches = _batches(images, (predicted + 1) % 10)  # asked for a class the classifier never gives them
    result = sample_metrics(_StandIn(lambda i, c, n: batches[i]["image"]), batches,
                            device=torch.device("cpu"), feature_model=features)  # fmt: skip
    assert result["class_accuracy"] == 0.0


def test_max_images_cuts_the_last_batch_and_an_unconditional_model_draws_as_many(features):
    images, labels = _real()
    batches = [{"image": b["image"]} for b in _batches(images, labels)]
    pipe = _StandIn(lambda i, cond, n: torch.zeros(n, 1, SIZE, SIZE), keys=())
    result = sample_metrics(pipe, batches, device=torch.device("cpu"), feature_model=features, max_images=11)
    assert result["num_images"] == 11 and [kw["num_samples"] for _, kw in pipe.calls] == [8, 3]
    assert [c for c, _ in pipe.calls] == [None, None]
    assert result["class_accuracy"] is None  # no class to judge


def test_a_condition_the_split_lacks_is_named():
    from ldmkit.errors import ConfigError

    images, _ = _real()
    pipe = _StandIn(lambda i, c, n: images[:n], keys=("caption",))
    with pytest.raises(ConfigError, match=r"reads \['caption'\], which the evaluation split's batches lack \(their keys: \['image'\]\)"):
        sample_metrics(pipe, [{"image": images}], device=torch.device("cpu"), feature_model=None)


# -- end to end -------------------------------------------------------------------------------
def _data():
    images, labels = _real()
    return lambda split, epoch: _batches(images, labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ldmkit.training import train

    root = tmp_path_factory.mktemp("ldm_eval")
    cfg = compose_config(["stage=ldm", "trainer=ldm_tiny", "trainer.max_steps=2", "trainer.num_threads=1",
                          "first_stage=identity", "first_stage.channels=1", "first_stage.latent_channels=1",
                          "data.channels=1", "denoiser=unet_tiny", "conditioner=class_label",
                          "conditioner.num_classes=10", f"image_size={SIZE}", f"run_dir={root / 'run'}",
                          "conditioner.class_names=[" + ",".join(f"'{c}'" for c in CLASSES) + "]"])  # fmt: skip
    threads = torch.get_num_threads()
    run = train(cfg, data=_data())
    torch.set_num_threads(threads)
    return run, _classifier(root / "clf.safetensors")


def test_a_trained_run_is_scored_and_the_report_written_and_repeatable(trained):
    run, classifier = trained
    options = ["stage=ldm", f"run_dir={run}", f"eval.feature_checkpoint={classifier}",
               "eval.fid_features=fashion_mnist", "sampler.steps=3", "eval.progress=false"]  # fmt: skip
    report = evaluate(compose_config(options), data=_data())
    written = run / "eval" / "ldm_test_step_2.json"
    assert report["output"] == str(written) and report["checkpoint"] == str(run / "pipeline") and report["step"] == 2
    assert json.loads(written.read_text())["frechet_distance"] == report["frechet_distance"] > 0
    assert report["num_images"] == N and 0 <= report["class_accuracy"] <= 1
    assert report["sampler"]["name"] == "ddim" and report["steps"] == 3 and report["seed"] == 0
    again = evaluate(compose_config(options), data=_data())
    assert (again["frechet_distance"], again["kid"], again["class_accuracy"]) == (
        report["frechet_distance"], report["kid"], report["class_accuracy"])
    other_seed = evaluate(compose_config([*options, "eval.seed=5"]), data=_data())
    assert other_seed["frechet_distance"] != report["frechet_distance"]


def test_labels_of_other_classes_are_not_judged_and_too_few_images_have_no_distance(trained, tmp_path):
    """The Fashion-MNIST classifier judged any class-conditional model (cat and dog as T-shirt and
    Trouser); one image crashed the Frechet distance after all the sampling."""
    from ldmkit.pipeline import Pipeline

    run, classifier = trained
    pipe = Pipeline.load(run / "pipeline")
    pipe.conditioner.class_names = ["cat", "dog", *CLASSES[2:]]
    options = ["stage=ldm", f"eval.feature_checkpoint={classifier}", "eval.fid_features=fashion_mnist",
               "sampler.steps=2", "eval.progress=false"]  # fmt: skip
    report = evaluate(compose_config(options), data=_data(), pipeline=pipe, write=False)
    assert report["class_accuracy"] is None and report["frechet_distance"] is not None
    assert report["skipped"]["class_accuracy"].startswith("the Fashion-MNIST classifier judges Fashion-MNIST's classes only")
    one = evaluate(compose_config([*options, f"run_dir={run}", "eval.max_images=1"]), data=_data(), write=False)
    assert one["num_images"] == 1 and one["frechet_distance"] is None and one["kid"] is None
    assert one["skipped"]["frechet_distance"] == "a Frechet distance needs at least 2 images, 1 scored"
    assert one["class_accuracy"] in (0.0, 1.0)  # still judged


def test_an_output_that_is_not_a_report_is_refused_before_sampling(trained, tmp_path):
    """eval.output=<the pipeline's config.yaml> replaced the model's config with the report."""
    from ldmkit.errors import ConfigError

    run, _ = trained
    config = run / "pipeline" / "config.yaml"
    before = config.read_bytes()
    (tmp_path / "old.json").write_text(json.dumps({"stage": "ldm"}))
    (tmp_path / "notes.json").write_text("[1, 2]")
    for target, said in [(config, "the report is JSON: name a .json file"),
                         (tmp_path / "notes.json", "exists and is not an evaluation report")]:  # fmt: skip
        cfg = compose_config(["stage=ldm", f"run_dir={run}", f"eval.output={target}", "eval.fid_features=none"])
        with pytest.raises(ConfigError, match=said):
            evaluate(cfg, data=lambda split, epoch: pytest.fail("sampled before refusing eval.output"))
    assert config.read_bytes() == before
    report = evaluate(compose_config(["stage=ldm", f"run_dir={run}", f"eval.output={tmp_path / 'old.json'}",
                                      "eval.fid_features=none", "sampler.steps=2", "eval.max_images=2",
                                      "eval.progress=false"]), data=_data())  # an earlier report: replaced  # fmt: skip
    assert json.loads((tmp_path / "old.json").read_text())["num_images"] == report["num_images"] == 2


def test_a_feature_checkpoint_that_is_no_classifier_is_one_line(trained, tmp_path):
    """Was a RuntimeError listing every key of both state dicts (tens of thousands of characters)."""
    from ldmkit.errors import WeightsError

    run, _ = trained
    model = run / "pipeline" / "model.safetensors"
    cfg = compose_config(["stage=ldm", f"run_dir={run}", "eval.fid_features=fashion_mnist",
                          f"eval.feature_checkpoint={model}", f"eval.output={tmp_path / 'r.json'}"])  # fmt: skip
    with pytest.raises(WeightsError) as err:
        evaluate(cfg, data=_data())
    assert str(err.value).startswith(f"{model} is not a Fashion-MNIST feature classifier (")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_a_split_of_another_image_size_is_said(trained):
    run, _ = trained
    images, labels = _real()
    small = [{"image": images[:4, :, :8, :8], "label": labels[:4]}]
    with pytest.warns(UserWarning, match="the split's images are 8x8, the model was trained at 16x16"):
        report = evaluate(compose_config(["stage=ldm", f"run_dir={run}", "eval.fid_features=none", "sampler.steps=2",
                                          "eval.progress=false"]), data=lambda split, epoch: small, write=False)  # fmt: skip
    assert report["image_size"] == [8, 8] and report["note"].startswith("the split's images are 8x8")


def test_the_cli_scores_a_pipeline_folder_on_prepared_data(trained, tmp_path):
    from ldmkit.data import prepare
    from tests.data.conftest import make_image_folder

    run, classifier = trained
    make_image_folder(tmp_path / "photos", per_class=3, size=(SIZE, SIZE))
    prepare("image_folder", tmp_path / "shards", path=str(tmp_path / "photos"), val_fraction=0.5, progress=False)
    out = ldmkit("evaluate", "stage=ldm", f"eval.checkpoint={run / 'pipeline'}", "data=image_folder",
                     f"data.path={tmp_path / 'shards'}", "data.channels=1", f"image_size={SIZE}",
                     "eval.fid_features=fashion_mnist", f"eval.feature_checkpoint={classifier}", "sampler.steps=2",
                     "eval.progress=false", f"eval.output={tmp_path / 'r.json'}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["split"] == "val" and report["num_images"] > 1 and report["frechet_distance"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == report["num_images"]


def test_a_folder_that_is_no_pipeline_is_one_line(tmp_path):
    out = ldmkit("evaluate", "stage=ldm", f"eval.checkpoint={tmp_path}", "eval.progress=false")
    assert out.returncode == 1
    assert out.stderr == (f"ldmkit evaluate: error: no trained pipeline at {tmp_path} (eval.checkpoint; checkpoint file "
                          f"missing: {tmp_path / 'config.yaml'}): give the run folder of an ldm training run, or a "
                          "pipeline folder, as run_dir=... or eval.checkpoint=...\n")
