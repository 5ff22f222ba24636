"""One loaded pipeline serving requests one at a time (no Gradio here).

:meth:`DemoSession.generate` checks a :class:`~ldmkit.demo.form.PageRequest`, runs
``Pipeline.sample`` in a worker thread and yields :class:`Step` events (with a decoded
preview of the current x0 prediction every few steps), then one :class:`Result`: the images
written the way ``ldmkit sample`` writes them (``<run>/samples.png``, ``<run>/samples/NNNNNN.png``
and ``<run>/samples.json``), the settings record, the command line that reproduces it and the
request's notes (the warnings it raised, prompts its text conditioner cut).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import secrets
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
    notes: list[str] = field(default_factory=list)  # this request's warnings, one line each


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

    def build(self, name: str, steps: int | None) -> tuple[Any, list[str]]:
        """``(sampler, the overrides that select it on the command line)``; ``steps`` None:
        the config's (a sampler to check a request against, before its steps are)."""
        from ldmkit.assembly import create_component
        from ldmkit.plugins import get_registry

        node = self.node(name)
        overrides = [] if name == self.current else [f"sampler={name}"]
        if steps is not None:
            node.steps = steps
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
        self._prompt_parts = _prompt_parts(pipeline, self.fields)

    def check(self, page: PageRequest) -> None:
        """Raise :class:`DemoInputError` for what :meth:`generate` would refuse before sampling
        (the inputs and the sampler), without sampling or keeping anything."""
        with tempfile.TemporaryDirectory(prefix="check-", dir=_mkdir(self.results_dir)) as scratch:
            self._prepare(page, Path(scratch) / "inputs")

    def _prepare(self, page: PageRequest, inputs_dir: Path) -> tuple[Prepared, Any, list[str]]:
        """``(the checked request, its sampler, the overrides that select it)``: checked
        against the sampler it picks, not the pipeline's (the last request's)."""
        chosen, _ = self.samplers.build(page.sampler, None)
        prepared = prepare(
            self.pipeline, page, inputs_dir=inputs_dir, fields=self.fields, sampler=chosen
        )
        sampler, overrides = self.samplers.build(page.sampler, prepared.request.steps)
        return prepared, sampler, overrides

    def generate(
        self, page: PageRequest, cancel: threading.Event | None = None
    ) -> Iterator[Step | Result]:
        """Check ``request``, sample, write the results; yields :class:`Step` events, then one
        :class:`Result`. Bad input raises :class:`DemoInputError` before anything runs; a
        failure while sampling raises it too (LdmkitError/ValueError messages, one line).
        The result's notes are the warnings this request raised (:func:`warnings_to`) and a
        line for each prompt its text conditioner cut or read in part as its unknown token
        (:meth:`_prompt_notes`)."""
        cancel = cancel or threading.Event()
        with self._lock:
            run_dir = self._new_run_dir()
            notes: list[str] = []
            try:
                with warnings_to(notes):
                    prepared, sampler, overrides = self._prepare(page, run_dir / "inputs")
                    self.pipeline.with_sampler(sampler)
                counts = {key: _prompt_counts(part) for key, part in self._prompt_parts.items()}
                images = yield from self._sample(prepared, cancel, notes)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            result = self._write(run_dir, prepared, overrides, images)
            result.notes = self._prompt_notes(counts, notes)
            yield result

    def _prompt_notes(self, before: dict[str, tuple[int, int]], notes: list[str]) -> list[str]:
        """``notes`` with a line for each prompt key whose text conditioner cut the prompt or
        read part of it as its unknown token in this request (its counts grew since
        ``before``; sampling is one request at a time, and only sampling encodes prompts).
        The line replaces the conditioner's own warning, which it gives once in a process
        (a long-running page would report only the first long prompt ever) and in a script's
        words ("further ones ... silently", ".truncated_prompts")."""
        out = list(notes)
        for key, part in self._prompt_parts.items():
            (cut, unknown), (was_cut, was_unknown) = _prompt_counts(part), before[key]
            cut, unknown = cut > was_cut, unknown > was_unknown
            if not (cut or unknown):
                continue
            out = [note for note in out if not note.startswith(f"{type(part).__name__}: ")]
            if cut:
                limits = (getattr(part, name, None) for name in ("max_length", "max_seq_len"))
                limit = next((n for n in limits if isinstance(n, int)), None)
                reads = f"the {limit} tokens" if limit else "the length"
                out.append(
                    f"{key}: the prompt is longer than {reads} its text encoder reads; the rest "
                    "was cut (the images follow the beginning only)"
                )
            if unknown:
                out.append(
                    f"{key}: the prompt holds text the text encoder's vocabulary does not know "
                    "(emoji, most symbols), read as its unknown token"
                )
        return out

    # -- sampling in a worker thread ---------------------------------------------------------
    def _steps(self, prepared: Prepared) -> tuple[int, int]:
        """``(the sampler's steps, those that run)``: with a start image, ``int(steps *
        strength)`` of them (:func:`ldmkit.diffusion.timesteps.truncate_for_strength`)."""
        sampler, request = self.pipeline.sampler, prepared.request
        try:
            total = len(sampler.timesteps(self.pipeline.schedule, request.steps))
        except Exception:  # a sampler without a step plan
            total = request.steps
        if request.init_image is not None and request.strength is not None:
            return total, int(total * request.strength)
        return total, total

    def _sample(self, prepared: Prepared, cancel: threading.Event, notes: list[str]):
        steps, total = self._steps(prepared)
        if total == 0:  # Pipeline.sample returns the start image's reconstruction
            notes.append(
                f"strength {prepared.request.strength:g} runs none of the {steps} steps "
                f"({steps} x {prepared.request.strength:g} rounds down to 0): the images are the "
                "start image as the first stage reconstructs it; raise the strength or the steps"
            )
        total = max(total, 1)
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
                with warnings_to(notes):
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


# -- a request's notes -----------------------------------------------------------------------

_NOTES: dict[int, list[str]] = {}  # thread id -> the notes of the request it works for
_INSTALL = threading.Lock()


class _Recorder:
    """``warnings.showwarning`` with a line added to the notes of the request the warning's
    thread works for (:data:`_NOTES`), if any; it shows the warning as ``show`` does."""

    def __init__(self, show: Any) -> None:
        self.show = show

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        notes = _NOTES.get(threading.get_ident())
        text = str(message).replace("\n", " ")
        if notes is not None and text not in notes:
            notes.append(text)
        self.show(message, category, filename, lineno, file, line)


@contextlib.contextmanager
def warnings_to(notes: list[str]) -> Iterator[None]:
    """The warnings this thread raises in the block, each appended to ``notes`` as one line
    (once) and shown as before (the server log); those of other threads are only shown.

    No ``warnings.catch_warnings``: it swaps process-wide state on the way in and out, so
    two that overlap in time leave one's filters or ``showwarning`` behind (Gradio enters
    it to decode an upload, in an input check that runs beside a sampling). Instead a
    :class:`_Recorder` stays in front of ``warnings.showwarning`` (put back there should
    something replace it) and reads which request a thread works for. Each block reports
    its warnings afresh: Python shows a warning once per place in the code (the "default"
    action) until its filters change, and the block adds the filter that is the default
    action anyway ("default" for every warning, last), which counts as a change; the
    filters in force stay as they are (``ldmkit demo`` makes PIL's decompression-bomb
    warning an error)."""
    me = threading.get_ident()
    with _INSTALL:
        if not isinstance(warnings.showwarning, _Recorder):
            warnings.showwarning = _Recorder(warnings.showwarning)
        warnings.filterwarnings("default", append=True)
        _NOTES[me] = notes
    try:
        yield
    finally:
        _NOTES.pop(me, None)


def _prompt_parts(pipeline: Any, fields: list[Any]) -> dict[str, Any]:
    """Prompt key -> the text conditioner that reads it and counts its cut prompts
    (``truncated_prompts``; ``ldmkit_text``'s conditioners)."""
    from ldmkit.sample_io.conditions import reading_part

    parts = {
        spec.key: reading_part(pipeline.conditioner, spec.key, "truncated_prompts")
        for spec in fields
        if spec.kind == "text"
    }
    return {key: part for key, part in parts.items() if part is not None}


def _prompt_counts(part: Any) -> tuple[int, int]:
    """A text conditioner's counts of cut prompts and of prompts with unknown text."""
    return int(part.truncated_prompts), int(getattr(part, "unknown_prompts", 0) or 0)


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
