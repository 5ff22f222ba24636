"""The code blocks of README.md and docs/ run, and the commands they show exist.

``python`` blocks
    Every ```` ```python ```` fence of README.md and docs/**/*.md (found when the tests are
    collected, so a new page is picked up without touching this file) is one test, with id
    ``file:line`` (the line of the opening fence). Rule: **the python blocks of one page run in
    order, in one namespace and one fresh temporary working directory**, as a reader pasting
    them one after another into one Python session would; block N's test first runs blocks
    1..N-1 of its page if they have not run yet (so ``-k`` may pick any block). Each page starts
    with fresh global state (plugin manager, data sources, environment, sys.path), which is
    restored when it ends. Tracebacks point at the markdown file's own lines.

    A block that is not meant to run (pseudo-code, an excerpt) belongs in a ```` ```text ````
    fence, not a ```` ```python ```` one. ``Test*`` classes a block defines (conformance
    mixins in use) are run too: every ``test_*`` method must pass.

Artifacts a user makes before a snippet (a trained pipeline, prepared data)
    A snippet naming a path under ``runs/`` or ``data/`` in a string (or a ``data=NAME``
    override, which reads ``data/NAME``) gets that path made first, inside its temporary
    directory, by the factory ``ARTIFACTS`` maps it to: a tiny stand-in of what the real
    command would have written. A path with no entry fails the test, naming the path; add a
    factory (or ``None`` for a path the snippet itself writes).

``bash`` blocks
    They are not run (they train for minutes). ``test_bash_blocks_name_real_commands`` checks
    that every ``ldmkit <subcommand>`` (and ``ldmkit data <subcommand>``, ``data prepare
    <source>``) they show exists and that every ``group=NAME`` option they pass for a config
    group is a config option (a file ``<group>/NAME.yaml`` in ``conf/`` or in an installed
    plugin's config root). ``test_bash_block_commands_compose_and_runs_do_not_collide``
    composes every concrete ``ldmkit train|evaluate|sample`` line (every override names a real
    key, as ``--print-config`` would find; nothing is trained) and checks that the lines of a
    page do not stop each other: no ``train`` line resumes another's run_dir with another model
    or with ``trainer.init_from`` (which a resume ignores), and a ``first_stage.checkpoint`` the
    docs train is loaded into the first stage it was trained as.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# -- finding the blocks ------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    file: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a markdown file (CommonMark fences, indentation removed)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(ROOT).as_posix()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, start = m["fence"], len(m["indent"]), i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$",
                                              lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        blocks.append(Block(rel, start + 1, m["info"].lower(), "\n".join(body) + "\n"))
        i += 1
    return blocks


ALL_BLOCKS = [b for path in doc_files() for b in fenced_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in {"python", "py", "python3"}]
BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang in {"bash", "sh", "shell", "console"}]


# -- artifacts a user would have made first ----------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fashion_mnist(path: Path) -> None:
    """`ldmkit data prepare fashion_mnist` run on 32 + 16 random IDX images (4 + 2 shards)."""
    from ldmkit.data import prepare

    raw = path.parent / ".fake_fashion_mnist_idx"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 32), ("t10k", 16)):
        _write_idx(raw / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    prepare("fashion_mnist", path, path=str(raw), shard_size=8, progress=False)


def make_fmnist_ldm_pipeline(path: Path) -> None:
    """What `ldmkit train experiment=fmnist_ldm_kl_f4` exports (class-conditional, grayscale),
    untrained and tiny: pixel space, 8x8, 2 DDIM steps."""
    import ldmkit

    pipe = ldmkit.compose(overrides=[
        "first_stage=identity", "first_stage.channels=1", "first_stage.latent_channels=1",
        "denoiser=unet_tiny", "conditioner=class_label", "sampler=ddim", "sampler.steps=2",
        "image_size=8",
    ])  # fmt: skip
    pipe.save(path)


# path (relative to the snippet's working directory) -> factory(path) that makes it, or None
# for a path the snippet writes itself. A snippet path "P/..." uses the entry for "P".
ARTIFACTS: dict[str, Callable[[Path], None] | None] = {
    "data/fashion_mnist": make_fashion_mnist,
    "runs/fmnist_ldm_kl_f4/pipeline": make_fmnist_ldm_pipeline,
}

INPUT_PATH = re.compile(r"""["']((?:runs|data)/[^"'\s]*?)/?["']""")
DATA_OVERRIDE = re.compile(r"""["']data=(\w+)["']""")


def ensure_artifacts(block: Block, cwd: Path) -> None:
    wanted = INPUT_PATH.findall(block.code) + [f"data/{n}" for n in DATA_OVERRIDE.findall(block.code)]
    for ref in wanted:
        key = next((k for k in ARTIFACTS if ref == k or ref.startswith(k + "/")), None)
        if key is None:
            pytest.fail(
                f"{block.id} refers to {ref!r}, which a user makes before running it, but "
                f"tests/test_docs_snippets.py has no factory for it: add one to ARTIFACTS "
                f"(or map it to None if the snippet writes it itself)",
                pytrace=False,
            )
        factory = ARTIFACTS[key]
        if factory is not None and not (cwd / key).exists():
            factory(cwd / key)


# -- running a page's python blocks -------------------------------------------------------------


@dataclass
class PageRun:
    """One page's namespace and working directory, and the global state to restore after it."""

    file: str
    cwd: Path
    namespace: dict = field(default_factory=dict)
    done: int = 0  # how many of the page's python blocks have run
    failed: list[str] = field(default_factory=list)
    saved: dict = field(default_factory=dict)

    def start(self) -> None:
        from ldmkit.plugins import reset_plugin_manager

        # data sources and stages live in the plugin manager: resetting it restores them
        self.saved = {"environ": dict(os.environ), "sys.path": list(sys.path),
                      "modules": set(sys.modules)}  # fmt: skip
        reset_plugin_manager()
        self.namespace.update(__name__="__main__", __file__=str(self.cwd / "snippet.py"))

    def finish(self) -> None:
        from ldmkit.plugins import reset_plugin_manager

        os.environ.clear()
        os.environ.update(self.saved["environ"])
        sys.path[:] = self.saved["sys.path"]
        for name in set(sys.modules) - self.saved["modules"]:
            module = sys.modules[name]
            # modules a snippet made (from files in its temporary directory), not libraries
            if str(getattr(module, "__file__", "") or "").startswith(str(self.cwd)):
                del sys.modules[name]
        reset_plugin_manager()

    def run(self, block: Block) -> None:
        ensure_artifacts(block, self.cwd)
        # pad so that line numbers in tracebacks are the markdown file's own
        code = compile("\n" * block.line + block.code, str(ROOT / block.file), "exec")
        before = dict(self.namespace)
        exec(code, self.namespace)
        new = {k: v for k, v in self.namespace.items() if before.get(k) is not v}
        run_test_classes(new)


def run_test_classes(namespace: dict) -> None:
    """A page that shows a test class (a conformance mixin subclass) must show one that
    passes: run every ``test_*`` method of the ``Test*`` classes a block defined."""
    for name, obj in namespace.items():
        if not (isinstance(obj, type) and name.startswith("Test")):
            continue
        for method in sorted(m for m in dir(obj) if m.startswith("test_")):
            try:
                getattr(obj(), method)()
            except pytest.skip.Exception:
                continue
            except Exception as exc:
                raise AssertionError(f"the page's {name}.{method} fails: {type(exc).__name__}: {exc}") from exc


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Returns page(file) -> its PageRun, starting a fresh one when the page changes."""
    current: dict[str, PageRun] = {}

    def page(file: str) -> PageRun:
        if file not in current:
            for old in current.values():
                old.finish()
            current.clear()
            cwd = tmp_path_factory.mktemp(re.sub(r"\W", "_", file))
            current[file] = PageRun(file, cwd)
            current[file].start()
        return current[file]

    yield page
    for old in current.values():
        old.finish()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs(block, pages, monkeypatch):
    page = pages(block.file)
    monkeypatch.chdir(page.cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(page.cwd))  # a snippet's mkdtemp goes with the page
    same_page = [b for b in PYTHON_BLOCKS if b.file == block.file]
    index = same_page.index(block)
    while page.done < index:  # earlier blocks of the page (when this one was picked alone)
        earlier = same_page[page.done]
        page.done += 1
        try:
            page.run(earlier)
        except Exception as exc:
            page.failed.append(f"{earlier.id} ({type(exc).__name__}: {exc})")
    if page.done > index:  # rerun of a block already run: start the page over
        pytest.skip(f"{block.id} already ran in this session")
    page.done += 1
    try:
        page.run(block)
    except Exception as exc:
        if page.failed:
            note = "; earlier blocks of the page failed, which may be the cause: " + ", ".join(page.failed)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
        page.failed.append(f"{block.id} ({type(exc).__name__}: {exc})")
        raise


# -- yaml blocks: a component option's keys are its constructor's arguments -------------------

COMPONENT_OPTION = re.compile(r"#\s*(?:\S*/)?(first_stage|denoiser|conditioner|sampler)/(\w+)\.yaml")


def test_component_option_blocks_name_constructor_arguments():
    """A yaml block headed ``# [conf/]GROUP/OPTION.yaml`` lists keyword arguments of the component
    its ``name`` (or the option its ``defaults`` extend) registers: docs/configuration.md's
    ``first_stage/kl_f8.yaml`` once showed ``embed_dim: 4``, which ``kl`` does not take (it is
    ``latent_channels``)."""
    import inspect

    import yaml

    from ldmkit.config import compose_config
    from ldmkit.plugins import get_registry

    wrong = []
    for block in (b for b in ALL_BLOCKS if b.lang in {"yaml", "yml"}):
        header = COMPONENT_OPTION.match(block.code)
        if header is None:
            continue
        group, node = header[1], yaml.safe_load(block.code)
        base = [d for d in node.pop("defaults", []) if d != "_self_"]
        name = node.pop("name", None) or compose_config([f"{group}={base[0]}"])[group]["name"]
        parameters = inspect.signature(get_registry().get(group, name).factory).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = sorted(set(node) - set(parameters) - {"checkpoint", "drop_rate"})
        wrong += [f"{block.id}: {group} {name!r} takes no {key!r}" for key in unknown]
    assert not wrong, "\n".join(wrong)


# -- bash blocks: the commands and options they name exist --------------------------------------

CONFIG_GROUPS = ("experiment", "first_stage", "conditioner", "sampler", "denoiser", "data", "trainer")
# options that docs name on purpose although nothing installs them: the example a page builds
DOC_ONLY_OPTIONS = {
    ("sampler", "my_sampler"): "docs/plugins.md writes this plugin as its example",
}


def config_options() -> set[tuple[str, str]]:
    from ldmkit.config import config_dir
    from ldmkit.plugins import _root_directory, get_plugin_manager, reset_plugin_manager

    reset_plugin_manager()
    roots = [Path(config_dir())] + [Path(_root_directory(r)) for r in get_plugin_manager().config_roots()]
    return {(group, p.stem) for root in roots for group in CONFIG_GROUPS
            for p in (root / group).glob("*.yaml")}  # fmt: skip


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, words) of each command of a bash block; continuations joined, comments dropped."""
    commands, pending, first = [], "", 0
    for offset, text in enumerate(block.code.splitlines(), start=block.line + 1):
        if not pending:
            first = offset
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + text, comments=True)
        pending = ""
        current: list[str] = []
        for word in words + [";"]:
            if word in {";", "&&", "||", "|", "&"}:
                if current:
                    commands.append((first, current))
                current = []
            else:
                current.append(word)
    return commands


def subcommand_flags() -> dict[str, set[str]]:
    """The ``--options`` each ``ldmkit`` subcommand's ``--help`` lists."""
    import contextlib
    import io

    from ldmkit.cli import SUBCOMMANDS

    flags = {}
    for name, (handler, description) in SUBCOMMANDS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            handler(["--help"], prog=f"ldmkit {name}", description=description)
        flags[name] = set(re.findall(r"--[\w-]+", out.getvalue()))
    return flags


def check_ldmkit_command(words: list[str], where: str, flags: dict[str, set[str]]) -> list[str]:
    """Problems with ``words`` = [subcommand, ...] of an ``ldmkit`` command line."""
    from ldmkit.data.cli import build_parser
    from ldmkit.data.sources import SOURCES

    sub = words[0] if words else None
    if sub not in flags:
        return [f"{where}: `ldmkit {sub}` is not a subcommand (there are {', '.join(flags)})"]
    problems = []
    if sub == "data":
        data_commands = next(a for a in build_parser()._actions if a.dest == "command").choices
        dsub = words[1] if len(words) > 1 else None
        if dsub not in data_commands:
            problems.append(f"{where}: `ldmkit data {dsub}` is not a subcommand "
                            f"(there are {', '.join(data_commands)})")
        elif dsub == "prepare" and (len(words) < 3 or words[2] not in SOURCES):
            source = words[2] if len(words) > 2 else None
            problems.append(f"{where}: `ldmkit data prepare {source}`: no such source "
                            f"(there are {', '.join(SOURCES)})")
        return problems
    for word in words[1:]:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags[sub]:
            problems.append(f"{where}: `ldmkit {sub} {flag}`: no such option "
                            f"(`ldmkit {sub} --help` lists {', '.join(sorted(flags[sub]))})")
        elif sub in OVERRIDE_SUBCOMMANDS and "=" in word and not word.startswith("-") and "<" not in word:
            problems += check_override(word, where)
    return problems


# the subcommands whose free words are Hydra overrides
OVERRIDE_SUBCOMMANDS = {"train", "evaluate", "sample"}


def check_override(word: str, where: str) -> list[str]:
    """A problem when Hydra's override grammar rejects ``word`` as the shell passes it
    (an unquoted ``{``, ``[`` or space in a value); ``<placeholder>`` words are not checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_overrides([word])
    except HydraException as err:
        return [f"{where}: `{word}` is not a valid override: {str(err).splitlines()[0]}"]
    return []


def test_bash_blocks_name_real_commands():
    import importlib.util

    from ldmkit.plugins import reset_plugin_manager

    flags = subcommand_flags()
    options = config_options()
    reset_plugin_manager()
    option_word = re.compile(rf"^({'|'.join(CONFIG_GROUPS)})=([\w-]+)$")
    problems, checked = [], 0
    for block in BASH_BLOCKS:
        for line, words in shell_commands(block):
            where = f"{block.file}:{line}"
            if words[0].startswith(("./", "scripts/")) and not (ROOT / words[0]).is_file():
                problems.append(f"{where}: `{words[0]}` is not a file of the repository")
            for i, word in enumerate(words):
                if Path(word).name == "ldmkit" and i == 0:
                    checked += 1
                    problems += check_ldmkit_command(words[1:], where, flags)
                elif word == "-m" and i + 1 < len(words):
                    checked += 1
                    if words[i + 1] == "ldmkit.cli":
                        problems += check_ldmkit_command(words[i + 2:], where, flags)
                    elif importlib.util.find_spec(words[i + 1]) is None:
                        problems.append(f"{where}: `-m {words[i + 1]}`: no such module")
                m = option_word.match(word)
                if m:
                    checked += 1
                    key = (m[1], m[2])
                    if key not in options and key not in DOC_ONLY_OPTIONS:
                        have = sorted(n for g, n in options if g == m[1])
                        problems.append(f"{where}: `{word}`: no such {m[1]} option "
                                        f"(there are {', '.join(have)})")
    assert checked, "found no `ldmkit` command in the bash blocks of README.md and docs/"
    assert not problems, "bash blocks name things that do not exist:\n" + "\n".join(problems)


# -- bash blocks: the train / evaluate / sample commands compose, and do not collide ------------

# keys a resumed run refuses to change (the stages' config_keys_that_must_match, the seed,
# and what trainer.trainable / trainer.frozen freeze): a second `ldmkit train` of the same
# run_dir that changes one of them stops instead of training
RESUME_FIXED = ("stage", "first_stage", "denoiser", "conditioner", "schedule", "scale_factor", "seed",
                "trainer.lora", "trainer.trainable", "trainer.frozen", "trainer.loss.disc_ndf",
                "trainer.loss.disc_num_layers", "trainer.loss.learn_logvar",
                "trainer.objective.learn_logvar", "trainer.ema.enabled")  # fmt: skip
# `ldmkit sample` options that take no value (every other --option takes the next word)
SAMPLE_SWITCHES = {"--print-config", "--show-conditions", "--no-progress"}


def doc_overrides(words: list[str]) -> list[str] | None:
    """The Hydra overrides of ``words`` = [train|evaluate|sample, ...] when the command composes
    a config of its own (not ``sample --checkpoint``) and names no placeholder; else None."""
    if words[0] not in OVERRIDE_SUBCOMMANDS or "--checkpoint" in words:
        return None
    if any(w == "..." or "<" in w for w in words):
        return None
    overrides, skip = [], False
    for word in words[1:]:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = "=" not in word and word not in SAMPLE_SWITCHES
        else:
            overrides.append(word)
    return overrides


def make_image_folder(path: Path) -> None:
    """`ldmkit data prepare image_folder path=~/photos out=data/photos val_fraction=0.05` of
    two classes of four 8x8 RGB images."""
    from PIL import Image

    from ldmkit.data import prepare

    raw = path.parent / ".photos"
    for c, name in enumerate(("cat", "dog")):
        (raw / name).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 100 * c, 0)).save(raw / name / f"{i}.png")
    prepare("image_folder", path, path=str(raw), image_size=8, val_fraction=0.25, progress=False)


def test_bash_block_commands_compose_and_runs_do_not_collide(tmp_path, monkeypatch):
    """Every concrete ``ldmkit train|evaluate|sample`` line of a bash block composes its config
    (every ``key=value`` names a real key or option: what ``--print-config`` does, nothing
    trained). A ``train`` line's run_dir is new where it starts from other weights
    (``trainer.init_from`` inside its own run_dir, or in the run_dir an earlier line of the page
    wrote, is not applied: the run resumes there), and two ``train`` lines of one page that write
    one run_dir describe the same model (else the second resumes the first and stops)."""
    from omegaconf import OmegaConf

    from ldmkit.config import compose_config
    from ldmkit.errors import LdmkitError
    from ldmkit.plugins import reset_plugin_manager
    from ldmkit.training.init_from import inside_architecture
    from ldmkit.training.state import config_changes, under, weights_only_key

    monkeypatch.chdir(tmp_path)
    for folder in ("photos", "more_photos"):  # what the pages prepare
        make_image_folder(tmp_path / "data" / folder)
    reset_plugin_manager()
    problems, composed = [], 0
    trained_first_stages: dict[str, tuple[str, dict]] = {}  # stage-1 run_dir -> (where, first_stage)
    loaded_first_stages: list[tuple[str, str, dict]] = []  # (where, first_stage.checkpoint, first_stage)
    for file in dict.fromkeys(b.file for b in BASH_BLOCKS):
        runs: dict[str, tuple[str, dict]] = {}  # run_dir -> (where, config) of the page's first train
        for block in (b for b in BASH_BLOCKS if b.file == file):
            for line, words in shell_commands(block):
                where = f"{block.file}:{line}"
                start = next((i + 1 for i, w in enumerate(words)
                              if Path(w).name == "ldmkit" and i == 0 or w == "ldmkit.cli"), None)  # fmt: skip
                overrides = doc_overrides(words[start:]) if start and start < len(words) else None
                if overrides is None:
                    continue
                if any(tuple(o.split("=", 1)) in DOC_ONLY_OPTIONS for o in overrides):
                    continue
                if "trainer.init_architecture=source" in overrides:  # the source's model: not here
                    overrides = [o for o in overrides if not inside_architecture(o)]
                try:
                    cfg = compose_config(overrides)
                except LdmkitError as err:
                    problems.append(f"{where}: `{' '.join(words)}` does not compose: {err}")
                    continue
                composed += 1
                first_stage = OmegaConf.to_container(cfg.first_stage, resolve=True)
                checkpoint = first_stage.pop("checkpoint", None)
                if checkpoint:
                    loaded_first_stages.append((where, os.path.normpath(checkpoint), first_stage))
                if words[start] != "train":
                    continue
                run_dir = os.path.normpath(cfg.run_dir)
                if cfg.stage == "autoencoder":
                    trained_first_stages.setdefault(run_dir, (where, first_stage))
                init_from = OmegaConf.select(cfg, "trainer.init_from")
                if init_from and os.path.normpath(init_from).startswith(run_dir):
                    problems.append(f"{where}: trainer.init_from={init_from} is inside the run_dir "
                                    f"{run_dir} it writes (the run resumes there instead): give it a run_dir")
                current = OmegaConf.to_container(cfg, resolve=True)
                if run_dir not in runs:
                    runs[run_dir] = (where, current)
                    continue
                first, saved = runs[run_dir]
                if init_from:
                    problems.append(f"{where}: trainer.init_from={init_from} is not applied: run_dir "
                                    f"{run_dir} holds {first}'s checkpoints, which it resumes; give it a run_dir")
                changed = [str(c) for c in config_changes(saved, current)
                           if under(c.key, RESUME_FIXED) and not weights_only_key(c.key)]  # fmt: skip
                if changed:
                    problems.append(f"{where}: writes run_dir {run_dir} as {first} does, with another "
                                    f"model ({'; '.join(changed[:3])}): it would resume {first}'s "
                                    f"run and stop; give it its own run_dir")
    for where, checkpoint, first_stage in loaded_first_stages:  # weights that fit the model built
        if checkpoint in trained_first_stages:
            trained_at, trained = trained_first_stages[checkpoint]
            changed = [str(c) for c in config_changes(trained, first_stage)]
            if changed:
                problems.append(f"{where}: first_stage.checkpoint={checkpoint} (trained by {trained_at}) "
                                f"with another first stage ({'; '.join(changed[:3])}): its weights do not fit")
    reset_plugin_manager()
    assert composed > 20, f"composed only {composed} commands of the bash blocks"
    assert not problems, "bash block commands that do not work as written:\n" + "\n".join(problems)
