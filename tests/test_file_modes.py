"""Files ldmkit writes keep the user's permissions (issue 26, item 8): every writer, atomic or
not, gives files ``0o666`` and folders ``0o777`` less the umask, as ``open()``, ``torch.save``
and diffusers do (``mkstemp`` alone would leave every atomically written file ``0o600``,
unreadable by a team or a server running as another user)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")

# each writer, in a process of its own started with the umask under test (the test process's
# umask is process-wide and stays as it is)
WRITERS = textwrap.dedent('''
    import os, sys
    os.umask(int(sys.argv[2], 8))
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    import ldmkit
    from ldmkit.sample_io.samples import write_samples
    from ldmkit.io import atomic_path, atomic_write, atomic_write_text
    from ldmkit.training.checkpoint import CheckpointManager

    out = Path(sys.argv[1])
    atomic_write_text(out / "text" / "notes.txt", "hello")
    atomic_write(out / "tensors" / "w.safetensors", lambda p: save_file({"w": torch.ones(2)}, str(p)))
    with atomic_path(out / "raw" / "data.bin") as tmp:
        tmp.write_bytes(b"x")
    pipeline = ldmkit.compose(overrides=["first_stage=identity", "denoiser=unet_tiny",
                                         "conditioner=class_label", "image_size=8"])
    pipeline.save(out / "pipeline")
    write_samples(torch.zeros(2, 3, 8, 8), out / "grids" / "samples.png", {"seed": 0})
    CheckpointManager(out / "checkpoints").save(
        1, model={"w": torch.ones(2)}, state={"step": 1}, config_yaml="a: 1\\n")
''')

EXPECTED_FILES = {
    "text/notes.txt", "tensors/w.safetensors", "raw/data.bin",
    "pipeline/config.yaml", "pipeline/model.safetensors",
    "grids/samples.png", "grids/samples.json", "grids/samples/000000.png",
    "checkpoints/step_000000001/model.safetensors", "checkpoints/step_000000001/meta.json",
}


def modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path):
    script = tmp_path / "write.py"
    script.write_text(WRITERS)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(script), str(out), oct(umask)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = modes(out)
    assert EXPECTED_FILES <= set(found)
    wrong = {
        name: oct(mode) for name, mode in found.items()
        if mode != (0o777 if (out / name).is_dir() else 0o666) & ~umask
    }
    assert wrong == {}, f"umask {umask:03o}"
