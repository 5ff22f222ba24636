"""One loaded pipeline serving requests one at a time (no Gradio here).

:meth:`DemoSession.generate` checks a :class:`~ldmkit.demo.form.PageRequest`, runs
``Pipeline.sample`` in a worker thread and yields :class:`Step` events (with a decoded
preview of the current x0 prediction every few steps), then one :class:`Result`: the images
written the way ``ldmkit sample`` writes them (``<run>/samples.png``, ``<run>/samples/NNNNNN.png``
and ``<run>/samples.json``), the settings record and the command line that reproduces it.
"""

from __future__ import annotations

import itertools
import json
import queue
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldmkit.demo.form import (
    PAGE_NAMES,
    DemoInputError,
    PageRequest,
    Prepared,
    caption,
    command_line,
    condition_fields,
    prepare,
    sampler_options,
    settings,
)
from ldmkit.errors import LdmkitError
from ldmkit.sampling_request import message

KEEP_RUNS = 64  # result folders kept on disk; the least recently written are deleted
PREVIEWS = 8  # about this many previews per request


@dataclass
class Step:
    done: int
    total: int
    preview: Any = None  # a PIL image (a grid of the decoded x0 predictions), or None


@dataclass
class Result:
    images: list[tuple[Path, str]]  # (PNG, caption) per sample
    record: dict[str, Any]  # what <run>/samples.json holds, plus "command"
    command: str
    files: list[Path]  # the grid, the settings JSON and the inputs, for download


class SamplingCancelled(Exception):
    """Raised from the progress callback when the page went away."""


class SamplerChoices:
    """The samplers a request may pick (the ``sampler=NAME`` options) and their configs.

    The checkpoint's own sampler keeps its saved options (``sampler.steps=S`` on the command
    line); another one starts from its config option (``sampler=NAME sampler.steps=S``),
    composed once, as ``ldmkit sample`` composes it.
    """

    def __init__(self, pipeline: Any) -> None:
        from omegaconf import OmegaConf

        config = pipeline.config
        self.saved = config.sampler if config is not None and "sampler" in config else None
        self.current = (
            OmegaConf.select(config, "choices.sampler", default=None)
            if config is not None
            else None
        )
        options = sampler_options()
        if self.current is None and self.saved is not None:
            self.current = str(self.saved.get("name"))
        if self.current is not None and self.current not in options:
            options.append(self.current)
        self.options = sorted(options)
        self._composed: dict[str, Any] = {}
        self._lock = threading.Lock()

    def node(self, name: str) -> Any:
        """The config of sampler ``name`` before the request's steps are set."""
        from omegaconf import OmegaConf

        if name == self.current and self.saved is not None:
            return OmegaConf.create(OmegaConf.to_container(self.saved, resolve=True))
        if name not in self.options:
            raise DemoInputError(
                f"sampler {name!r} is not installed; choose one of {', '.join(self.options)}"
            )
        with self._lock:
            if name not in self._composed:
                from ldmkit.config import compose_config

                try:
                    self._composed[name] = compose_config([f"sampler={name}"]).sampler
                except LdmkitError as err:
                    raise DemoInputError(f"sampler {name}: {err}") from None
            return OmegaConf.create(OmegaConf.to_container(self._composed[name], resolve=True))

    def default_steps(self, name: str) -> int:
        return int(self.node(name).get("steps", 50))

    def build(self, name: str, steps: int) -> tuple[Any, list[str]]:
        """``(sampler, the overrides that select it on the command line)``."""
        from ldmkit.assembly import create_component
        from ldmkit.plugins import get_registry

        node = self.node(name)
        node.steps = steps
        overrides = [] if name == self.current else [f"sampler={name}"]
        overrides.append(f"sampler.steps={steps}")
        try:
            sampler = create_component(get_registry(), "sampler", node, f"sampler={name}")
        except LdmkitError as err:
            raise DemoInputError(str(err)) from None
        return sampler, overrides


class DemoSession:
    """A pipeline loaded once, sampling for one request at a time."""

    def __init__(
        self, pipeline: Any, *, checkpoint: Path | str, device: str, results_dir: Path
    ) -> None:
        from ldmkit import precision as _precision

        self.pipeline = pipeline.eval()
        self.checkpoint = Path(checkpoint).absolute()  # the command runs from any folder
        self.device = str(device)
        self.precision = _precision.resolve("auto", device)  # as `ldmkit sample` resolves it
        self.results_dir = Path(results_dir)
        self.fields = condition_fields(pipeline)
        self.samplers = SamplerChoices(pipeline)
        self._lock = threading.Lock()  # one sampling at a time, whatever the page's queue does

    def check(self, page: PageRequest) -> None:
        """Raise :class:`DemoInputError` for what :meth:`generate` would refuse before sampling
        (the inputs and the sampler), without sampling or keeping anything."""
        with tempfile.TemporaryDirectory(prefix="check-", dir=_mkdir(self.results_dir)) as scratch:
            prepared = prepare(
                self.pipeline, page, inputs_dir=Path(scratch) / "inputs", fields=self.fields
            )
        self.samplers.build(page.sampler, prepared.request.steps)

    def generate(
        self, page: PageRequest, cancel: threading.Event | None = None
    ) -> Iterator[Step | Result]:
        """Check ``request``, sample, write the results; yields :class:`Step` events, then one
        :class:`Result`. Bad input raises :class:`DemoInputError` before anything runs; a
        failure while sampling raises it too (LdmkitError/ValueError messages, one line)."""
        cancel = cancel or threading.Event()
        with self._lock:
            run_dir = self._new_run_dir()
            try:
                prepared = prepare(
                    self.pipeline, page, inputs_dir=run_dir / "inputs", fields=self.fields
                )
                sampler, overrides = self.samplers.build(page.sampler, prepared.request.steps)
                self.pipeline.with_sampler(sampler)
                images = yield from self._sample(prepared, cancel)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            yield self._write(run_dir, prepared, overrides, images)

    # -- sampling in a worker thread ---------------------------------------------------------
    def _total_steps(self, prepared: Prepared) -> int:
        sampler, request = self.pipeline.sampler, prepared.request
        try:
            total = len(sampler.timesteps(self.pipeline.schedule, request.steps))
        except Exception:  # a sampler without a step plan
            total = request.steps
        if request.init_image is not None and request.strength is not None:
            total = int(total * request.strength)
        return max(total, 1)

    def _sample(self, prepared: Prepared, cancel: threading.Event):
        total = self._total_steps(prepared)
        every = max(1, total // PREVIEWS)
        events: queue.Queue = queue.Queue()
        done = itertools.count(1)
        pipeline = self.pipeline

        def callback(info: dict) -> None:
            if cancel.is_set():
                raise SamplingCancelled
            k = next(done)
            preview = None
            if k % every == 0 and k < total and info.get("x0") is not None:
                preview = preview_grid(pipeline.decode(info["x0"]).clamp(-1, 1))
            events.put(Step(min(k, total), total, preview))

        def work() -> None:
            try:
                images = pipeline.sample(
                    replace(prepared.request, callback=callback, precision=self.precision)
                )
                events.put(("done", images))
            except BaseException as err:  # handed to the generator, which raises it there
                events.put(("error", err))

        thread = threading.Thread(target=work, name="ldmkit-demo-sampling", daemon=True)
        thread.start()
        try:
            yield Step(0, total)
            while True:
                event = events.get()
                if isinstance(event, Step):
                    yield event
                    continue
                kind, value = event
                if kind == "done":
                    return value
                if isinstance(value, (LdmkitError, ValueError, FileNotFoundError)):
                    raise DemoInputError(message(value, PAGE_NAMES)) from None
                raise value
        finally:
            cancel.set()  # the page went away (or we are done): stop at the next step
            thread.join()

    # -- results -----------------------------------------------------------------------------
    def _new_run_dir(self) -> Path:
        """``run-<32 random hex digits>``: a name no other user of the page can guess (nor
        count up to, as ``run-000002`` after ``run-000001``)."""
        _mkdir(self.results_dir)
        runs = sorted(
            (p for p in self.results_dir.iterdir() if p.is_dir() and p.name.startswith("run-")),
            key=lambda p: p.stat().st_mtime_ns,
        )
        for old in runs[: max(0, len(runs) - KEEP_RUNS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
        run_dir = self.results_dir / f"run-{secrets.token_hex(16)}"
        run_dir.mkdir()
        return run_dir

    def _write(
        self, run_dir: Path, prepared: Prepared, overrides: list[str], images: torch.Tensor
    ) -> Result:
        from ldmkit.sample_io.conditions import class_names_by_key
        from ldmkit.sample_io.samples import sampler_settings, write_samples

        record = settings(
            checkpoint=self.checkpoint,
            sampler=sampler_settings(self.pipeline),
            prepared=prepared,
            images=images,
            overrides=overrides,
            device=self.device,
            precision=self.precision,
        )
        out = run_dir / "samples.png"
        written = write_samples(
            images,
            out,
            record,
            conditioner=self.pipeline.conditioner,
            batch=prepared.request.batch,
            kinds=prepared.kinds,
            names=class_names_by_key(self.pipeline),
            files={  # one file per key, for every image, named as ldmkit sample names it
                flag.removeprefix("--cond "): [name] * images.shape[0]
                for flag, name in prepared.sources.items()
                if flag.startswith("--cond ")
            },
        )
        record = json.loads(written["settings"].read_text())
        command = command_line(
            checkpoint=self.checkpoint, overrides=overrides, prepared=prepared, device=self.device
        )
        record["command"] = command
        pngs = [
            (run_dir / entry["file"], caption(prepared, self.fields, i))
            for i, entry in enumerate(record["images"])
        ]
        inputs = sorted((run_dir / "inputs").glob("*")) if (run_dir / "inputs").is_dir() else []
        return Result(pngs, record, command, [written["grid"], written["settings"], *inputs])


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def preview_grid(images: torch.Tensor):
    """B×C×H×W in [-1, 1] -> one PIL image, a roughly square grid."""
    from ldmkit.pipeline import image_grid_rows
    from ldmkit.sample_io.samples import to_pil
    from ldmkit.visualize import make_grid

    grid = make_grid(
        images.detach().float().cpu(),
        nrow=image_grid_rows(images.shape[0]),
        padding=1,
        pad_value=1.0,
    )
    return to_pil(grid[: images.shape[1]])
