from __future__ import annotations

import atexit
import functools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from ldmkit.plugins import reset_plugin_manager

TESTS = Path(__file__).parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest-xdist worker per core: each worker (and every process it
    # starts, through OMP_NUM_THREADS) then computes on one thread, so that workers never wait
    # on each other's OpenMP threads (two 2-thread processes on 2 cores ran 13x slower)
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
LDMKIT = Path(sys.executable).with_name("ldmkit")


def ldmkit_cli(
    *args: str, env: dict | None = None, timeout: int = 300, cwd: str | os.PathLike | None = None
) -> subprocess.CompletedProcess:
    """The ``ldmkit`` command in a process of its own, with this shell's ``LDMKIT_*``
    switches cleared (plus ``env``), run in ``cwd`` (default: this one)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LDMKIT_")}
    return run_ldmkit(args, {**clean, **(env or {})}, cwd, timeout)


def run_ldmkit(
    args: Sequence[str], env: dict, cwd: str | os.PathLike | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``ldmkit *args`` as a process of its own with exactly ``env``: forked from this
    worker's warm interpreter (``tests/cli_zygote.py``: torch and the other libraries already
    imported, ldmkit not), or the console script in a plain subprocess where ``env`` differs
    from that interpreter's in anything but ``LDMKIT_*`` (``PYTHONPATH``, ``HOME``, ...) or
    ``LDMKIT_TEST_PLAIN_SUBPROCESS=1`` is set."""
    zygote = None if os.environ.get("LDMKIT_TEST_PLAIN_SUBPROCESS") == "1" else _zygote()
    if zygote is None or not zygote.serves(env):
        return subprocess.run(
            [str(LDMKIT), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
        )
    return zygote.run(list(args), env, os.fspath(cwd) if cwd is not None else os.getcwd(), timeout)


class _Zygote:
    """The client of one ``tests/cli_zygote.py`` server (one per pytest worker)."""

    def __init__(self) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LDMKIT_")}
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "cli_zygote.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=self.env, cwd=TESTS.parent,
        )  # fmt: skip
        if json.loads(self.process.stdout.readline() or "{}").get("ready") is not True:
            raise RuntimeError("tests/cli_zygote.py did not start (its stderr is above)")

    def serves(self, env: dict) -> bool:
        return self.process.poll() is None and _outside(env) == _outside(self.env)

    def run(self, args: list[str], env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory(prefix="ldmkit-cli-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"args": args, "env": env, "cwd": cwd, "timeout": timeout, "exe": str(LDMKIT),
                       "stdout": str(out), "stderr": str(err)}  # fmt: skip
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"tests/cli_zygote.py ended (exit status {self.process.wait()})")
            reply = json.loads(line)
            stdout = out.read_text(errors="replace") if out.exists() else ""
            stderr = err.read_text(errors="replace") if err.exists() else ""
        command = [str(LDMKIT), *args]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(command, reply["rc"], stdout, stderr)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _outside(env: dict) -> dict:
    """What of ``env`` a forked command cannot take on: all but ldmkit's switches (read when
    ldmkit is imported) and pytest's name of the current test."""
    return {k: v for k, v in env.items() if not k.startswith("LDMKIT_") and k != "PYTEST_CURRENT_TEST"}


@functools.cache
def _zygote() -> _Zygote | None:
    try:
        zygote = _Zygote()
    except (OSError, RuntimeError, ValueError):
        return None
    atexit.register(zygote.close)
    return zygote


def pip_install_project(project: Path, target: Path) -> Path:
    """``pip install`` the project folder ``project`` (non-editable, no dependencies, no build
    isolation: offline) into ``target``; returns ``target`` (put it on PYTHONPATH)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(project)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return target
TOY_OVERRIDES = [
    "first_stage=toy_fs",
    "denoiser=toy_denoiser",
    "conditioner=toy_cond",
    "sampler=toy_sampler",
    "image_size=8",
]


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A plugin manager that rediscovers entry points (env switches apply) and is reset after."""
    for var in ("LDMKIT_STRICT_PLUGINS", "LDMKIT_DISABLE_PLUGIN_AUTOLOAD", "LDMKIT_LOAD_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def toy(ldmkit_plugin):
    """Registers the toy plugin; returns the overrides that compose a toy pipeline."""
    sys.path.insert(0, str(TESTS))
    try:
        import toy_plugin
    finally:
        sys.path.remove(str(TESTS))
    ldmkit_plugin(toy_plugin, name="toy")
    return list(TOY_OVERRIDES)


def make_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str], group: str = "ldmkit") -> None:
    """Write an installed distribution (a .dist-info with entry points in ``group``) and its modules."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{eps}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugins):
    """A directory on sys.path to install fake distributions into."""
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    return directory
