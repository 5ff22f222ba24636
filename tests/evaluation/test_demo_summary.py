"""The demo's summary (python -m ldmkit.evaluation.demo_summary) on a tiny fake demo folder:
a stand-in classifier reads the class off each sample's brightness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ldmkit.evaluation import classifier as classifier_module
from ldmkit.evaluation import demo_summary
from ldmkit.evaluation.classifier import FashionMNISTClassifier


class BrightnessClassifier(nn.Module):
    """Class c for an image of mean brightness near c/9 (in [0, 1])."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        level = ((images.mean(dim=(1, 2, 3)) + 1) / 2 * 9).round().long().clamp(0, 9)
        return nn.functional.one_hot(level, 10).float()


def _write_demo(root, *, labels, shown):
    """A demo folder: two stage-1 evaluations (steps 5 and 10) and samples of classes
    ``shown`` listed in samples.json with the intended ``labels``."""
    evaluation = root / "kl_f4" / "eval"
    evaluation.mkdir(parents=True)
    for step, psnr in ((5, 20.0), (10, 27.5)):
        report = {"step": step, "psnr": psnr, "ssim": 0.9, "num_images": 50, "split": "test"}
        (evaluation / f"autoencoder_test_step_{step}.json").write_text(json.dumps(report))
    (root / "samples").mkdir()
    entries = []
    for i, (label, drawn) in enumerate(zip(labels, shown, strict=True)):
        pixels = np.full((32, 32), round(drawn / 9 * 255), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(root / "samples" / f"{i:06d}.png")
        entries.append({"file": f"samples/{i:06d}.png", "seed": i, "label": label})
    record = {"guidance_scale": 3.0, "sampler": {"name": "ddim", "steps": 50}, "grid": "samples.png",
              "images": entries}
    (root / "samples.json").write_text(json.dumps(record))
    return root


@pytest.fixture
def fake_classifier(monkeypatch, tmp_path):
    path = tmp_path / "classifier.safetensors"
    monkeypatch.setattr(demo_summary, "ensure_classifier",
                        lambda path_arg=None, **kwargs: (BrightnessClassifier(), 0.9, path))
    return path


def test_passes_and_names_every_file(tmp_path, fake_classifier, capsys):
    labels = list(range(10)) * 2
    demo = _write_demo(tmp_path / "demo", labels=labels, shown=labels)
    assert demo_summary.main(["--demo-dir", str(demo), "--floor", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "PSNR 27.50 dB" in out  # the newest evaluation (step 10), not step 5
    assert "100.0%" in out and "PASS" in out and "90.0%" in out  # samples vs the classifier on real images
    for path in (demo / "samples.png", demo / "samples", demo / "samples.json", demo / "ldm" / "pipeline",
                 demo / "kl_f4" / "eval" / "autoencoder_test_step_10.json", fake_classifier,
                 demo / "summary.json"):
        assert str(path) in out
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["passed"] and summary["samples"]["count"] == 20 and summary["autoencoder"]["step"] == 10
    assert "held_out" not in summary and "held-out conditions" not in out  # the demo ran no ldm evaluation here


def test_the_newest_ldm_evaluation_is_shown_where_the_demo_ran_one(tmp_path, fake_classifier, capsys):
    labels = list(range(10))
    demo = _write_demo(tmp_path / "demo", labels=labels, shown=labels)
    evaluation = demo / "ldm" / "eval"
    evaluation.mkdir(parents=True)
    for step, accuracy in ((500, 0.5), (1000, 0.84)):
        report = {"stage": "ldm", "step": step, "split": "test", "num_images": 200, "class_accuracy": accuracy,
                  "frechet_distance": 1.234, "kid": 0.0123, "frechet_features": "fashion_mnist",
                  "steps": 50, "guidance_scale": 3.0}  # fmt: skip
        (evaluation / f"ldm_test_step_{step}.json").write_text(json.dumps(report))
    assert demo_summary.main(["--demo-dir", str(demo)]) == 0
    out = capsys.readouterr().out
    assert ("held-out conditions (ldmkit evaluate): 200 samples for the labels of as many test images (50 steps, "
            "guidance 3.0): the classifier finds their class in 84.0%; Frechet distance 1.23, KID 0.0123 to those "
            "images (fashion_mnist features)") in out
    assert str(evaluation / "ldm_test_step_1000.json") in out
    held = json.loads((demo / "summary.json").read_text())["held_out"]
    assert held["step"] == 1000 and held["class_accuracy"] == 0.84


def test_low_accuracy_fails_with_exit_code_1(tmp_path, fake_classifier, capsys):
    labels = list(range(10))
    shown = [0, 1, 2, 3, 4, 5, 6, 0, 0, 0]  # 7 of 10 right
    demo = _write_demo(tmp_path / "demo", labels=labels, shown=shown)
    assert demo_summary.main(["--demo-dir", str(demo), "--floor", "0.75"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: sample accuracy 70.0% < floor 75%" in out
    assert "7:0%" in out and "6:100%" in out  # per class
    assert json.loads((demo / "summary.json").read_text())["passed"] is False


def test_missing_evaluation_exits_2_naming_the_folder(tmp_path, fake_classifier, capsys):
    demo = _write_demo(tmp_path / "demo", labels=[0], shown=[0])
    for report in (demo / "kl_f4" / "eval").iterdir():
        report.unlink()
    assert demo_summary.main(["--demo-dir", str(demo)]) == 2
    err = capsys.readouterr().err
    assert "no autoencoder evaluation in" in err and str(demo / "kl_f4" / "eval") in err


def test_missing_samples_exit_2_naming_the_file(tmp_path, fake_classifier, capsys):
    demo = _write_demo(tmp_path / "demo", labels=[0], shown=[0])
    (demo / "samples.json").unlink()
    assert demo_summary.main(["--demo-dir", str(demo)]) == 2
    assert str(demo / "samples.json") in capsys.readouterr().err


def test_floor_outside_0_1_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        demo_summary.main(["--demo-dir", str(tmp_path), "--floor", "80"])


def test_trains_the_classifier_where_it_is_missing(tmp_path, monkeypatch):
    calls = []

    def fake_train(out, *, epochs):  # writes what the real trainer writes, with its metadata
        calls.append(epochs)
        state = {k: v.contiguous() for k, v in FashionMNISTClassifier().state_dict().items()}
        save_file(state, str(out), metadata={"test_accuracy": "0.8912"})
        return {"test_accuracy": 0.8912}

    monkeypatch.setattr(classifier_module, "train_fashion_mnist_classifier", fake_train)
    path = tmp_path / "cache" / "classifier.safetensors"
    path.parent.mkdir()
    messages = []
    model, accuracy, used = demo_summary.ensure_classifier(path, epochs=3, log=messages.append)
    assert calls == [3] and used == path and accuracy == pytest.approx(0.8912)
    assert isinstance(model, FashionMNISTClassifier) and "training it (3 epochs" in messages[0]
    demo_summary.ensure_classifier(path, epochs=3, log=messages.append)  # now cached: no training
    assert calls == [3]


def test_real_accuracy_is_measured_when_the_file_does_not_record_it(tmp_path, monkeypatch):
    path = tmp_path / "classifier.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    images = np.stack([np.full((28, 28), round(c / 9 * 255), dtype=np.uint8) for c in range(10)])
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])  # the last one is wrong
    monkeypatch.setattr(classifier_module, "fashion_mnist_arrays", lambda split: (images, labels))
    # the classifier sees the images padded to 32x32 with black: judge the 28x28 centre
    assert demo_summary.real_accuracy(CentreBrightnessClassifier(), path) == pytest.approx(0.9)


class CentreBrightnessClassifier(BrightnessClassifier):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images[..., 2:-2, 2:-2])
