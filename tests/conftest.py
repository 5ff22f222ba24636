from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
    """The real ``ldmkit`` console script, with this shell's ``LDMKIT_*`` switches cleared
    (plus ``env``), run in ``cwd`` (default: this one)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LDMKIT_")}
    return subprocess.run(
        [str(LDMKIT), *args], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=timeout, cwd=cwd
    )


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
