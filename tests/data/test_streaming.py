"""Streamed shards: ``data.path`` as an HTTP folder, a brace-expanded shard list or a ``pipe:``
command, read through webdataset's ``gopen`` (curl for http, a shell for ``pipe:``) from a real
HTTP server in this process (``http.server`` on 127.0.0.1, port 0) serving prepared shards.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import itertools
import logging
import socket
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from ldmkit.data import DataError, build_dataloader, build_dataset, prepare

from .conftest import loader_cfg, make_image_folder

KEYS = [f"train-{i:07d}" for i in range(24)]  # written in order, 3 per shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 images in 8 shards of 3 (train only)."""
    tmp = tmp_path_factory.mktemp("streaming")
    make_image_folder(tmp / "images", per_class=8)
    out = tmp / "shards"
    prepare("image_folder", out, path=str(tmp / "images"), shard_size=3, progress=False)
    return out


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder, but not the files in ``server.missing`` (404); a shard named in
    ``server.drops`` (name -> times) has its connection dropped half-way through the body that
    many times (the headers promise the whole file); one in ``server.stalls`` likewise sends
    half of its body and then nothing more, keeping the connection open until the server stops."""

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests[name] += 1
        if name in self.server.missing:
            self.send_error(404)
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:
        name = self.path.lstrip("/")
        for faults in (self.server.drops, self.server.stalls):
            if faults.get(name, 0) > 0:
                faults[name] -= 1
                data = source.read()
                outputfile.write(data[: len(data) // 2])
                outputfile.flush()
                if faults is self.server.stalls:
                    self.server.stopped.wait()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
        super().copyfile(source, outputfile)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """``folder`` over HTTP on 127.0.0.1 (a free port): ``server.url``, ``server.requests``
    (name -> GETs), ``server.drops``, ``server.stalls``, ``server.missing`` (see ShardHandler)."""
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(ShardHandler, directory=str(folder))
    )
    httpd.requests, httpd.drops, httpd.stalls, httpd.missing = Counter(), {}, {}, set()
    httpd.stopped = threading.Event()  # ends the stalled answers
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        yield httpd
    finally:
        httpd.stopped.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(shards):
    with serve(shards) as httpd:
        yield httpd


def cfg(path, **overrides) -> dict:
    return loader_cfg(path, retry_delay=0, **overrides)


def keys_of(loader, limit=None) -> list[str]:
    batches = itertools.islice(iter(loader), limit) if limit is not None else loader
    return [k for batch in batches for k in batch["__key__"]]


def test_http_folder_reads_what_the_disk_has(shards, server):
    """``data.path=http://host`` (the prepared folder served as is): the same samples, in the
    same seeded order, as from disk; each epoch is reshuffled."""
    local = build_dataloader(cfg(shards), batch_size=4, seed=3)
    remote = build_dataloader(cfg(server.url), batch_size=4, seed=3)
    assert remote.directory == server.url and remote.num_samples == 24
    assert all(s.startswith(server.url + "/train-") for s in remote.dataset.shards)
    for epoch in range(2):
        a, b = list(local), list(remote)
        assert [k for x in a for k in x["__key__"]] == [k for x in b for k in x["__key__"]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
        if epoch == 0:
            first = [k for x in b for k in x["__key__"]]
    second = [k for x in b for k in x["__key__"]]
    assert sorted(first) == sorted(second) == KEYS and first != second
    assert remote.stats.retries == 0 and remote.stats.skipped == 0
    assert build_dataset(cfg(server.url), validate=False)[0]["image"].shape == (3, 10, 10)


@pytest.mark.parametrize("workers", [0, 2])
def test_dropped_connection_is_retried_and_counted_losing_nothing(shards, server, workers, caplog):
    expected = keys_of(build_dataloader(cfg(shards), batch_size=2, num_workers=workers, seed=1))
    server.drops["train-000002.tar"] = 1
    loader = build_dataloader(cfg(server.url), batch_size=2, num_workers=workers, seed=1)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        got = keys_of(loader)
    assert got == expected  # nothing lost, nothing twice, same order
    assert server.requests["train-000002.tar"] == 2
    assert loader.stats.retries == 1 and loader.stats.skipped == 0
    assert loader.stats.as_dict()["retries"] == 1
    if workers == 0:  # a worker logs in its own process
        (line,) = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
        assert f"{server.url}/train-000002.tar" in line and "1 of 5" in line


def test_retries_exhausted_is_one_error_naming_the_shard(shards, server):
    server.drops["train-000001.tar"] = 100
    loader = build_dataloader(cfg(server.url, retries=2), batch_size=2, num_workers=2)
    with pytest.raises(DataError) as info:
        keys_of(loader)
    message = str(info.value)
    assert "\n" not in message and f"{server.url}/train-000001.tar" in message
    assert "after 2 retries" in message
    assert server.requests["train-000001.tar"] == 3


def test_http_errors_are_answers_not_retried(shards, server):
    """A 404 (curl -f: exit 22; curl itself already retried 5xx answers) fails at once, naming
    the URL; so does a listed shard the manifest does not have."""
    server.missing.add("train-000003.tar")
    with pytest.raises(DataError, match=rf"{server.url}/train-000003.tar: .*HTTP") as info:
        keys_of(build_dataloader(cfg(server.url), batch_size=2, num_workers=2))
    assert "\n" not in str(info.value) and server.requests["train-000003.tar"] == 1
    with pytest.raises(DataError, match=rf"{server.url}/nowhere/manifest.json: .*HTTP"):
        build_dataloader(cfg(f"{server.url}/nowhere"), batch_size=2)
    listed = f"{server.url}/train-{{000000..000001}}.tar::{server.url}/train-000009.tar"
    with pytest.raises(DataError, match=r"train-000009.tar, which .*manifest.json does not list"):
        build_dataloader(cfg(listed), batch_size=2)


def test_pipe_cat_with_a_brace_list(shards):
    """``pipe:CMD``: each shard is the command's stdout; the manifest is read by the same
    command with the shard name replaced by manifest.json."""
    path = f"pipe:cat {shards}/train-{{000000..000003}}.tar"
    loader = build_dataloader(cfg(path), batch_size=5, shuffle=False)
    assert loader.dataset.shards[0] == f"pipe:cat {shards}/train-000000.tar"
    assert keys_of(loader) == KEYS[:12]
    from ldmkit.data.location import locate

    assert locate(path).manifest == f"pipe:cat {shards}/manifest.json"


def test_short_stream_is_retried_damaged_tar_is_skipped(shards, tmp_path):
    """A command that exits 0 with fewer bytes than the manifest lists is a broken transfer
    (retried, then one error); a shard that arrives whole but is damaged inside is skipped like
    a damaged file. ``data.manifest`` names the manifest explicitly."""
    whole = (shards / "train-000000.tar").read_bytes()
    manifest = str(shards / "manifest.json")
    short = f"pipe:head -c 3000 {shards}/train-000000.tar"
    with pytest.raises(DataError, match=rf"the stream ended after 3000 of {len(whole)} bytes"):
        keys_of(build_dataloader(cfg(short, manifest=manifest, retries=1), batch_size=2))
    with tarfile.open(shards / "train-000000.tar") as archive:  # the third sample's header
        at = next(m.offset for m in archive if m.name.startswith(KEYS[2]))
    damaged = tmp_path / "train-000000.tar"
    damaged.write_bytes(whole[:at] + b"x" * 512 + whole[at + 512 :])
    loader = build_dataloader(cfg(f"pipe:cat {damaged}", manifest=manifest), batch_size=2)
    assert keys_of(loader) == KEYS[:1]  # the second sample was being read when it broke
    assert loader.stats.counts["truncated"] == 1
    assert loader.stats.retries == 0


def within(seconds: float, read):
    """``read()``, failing the test instead of hanging it when it takes over ``seconds``."""
    result = {}

    def run() -> None:
        try:
            result["value"] = read()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds} s: the stalled stream hangs"
    if "error" in result:
        raise result["error"]
    return result["value"]


def running(pid: int) -> bool:
    """Whether process ``pid`` is alive (exists and is no zombie; Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def left_running(text: str = "", pids: tuple[int, ...] = ()) -> list[int]:
    """Of ``pids`` and the processes whose command line holds ``text``, those still alive a
    moment later (a killed process may take a few milliseconds to go)."""
    deadline = time.monotonic() + 5
    while True:
        found = [pid for pid in pids if running(pid)]
        for entry in Path("/proc").iterdir() if text else ():
            with contextlib.suppress(OSError):
                if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                    found += [int(entry.name)] if running(int(entry.name)) else []
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("always", [False, True])
def test_stalled_http_transfer_is_cut_and_retried(shards, server, always, caplog):
    """A server that sends half a shard and then nothing, keeping the connection open: after
    ``data.stall_timeout`` seconds without a byte, curl is killed and the shard read again
    like a transfer cut short (nothing lost); one that always stalls ends in one error."""
    name, url = "train-000002.tar", f"{server.url}/train-000002.tar"
    server.stalls[name] = 100 if always else 1
    loader = build_dataloader(cfg(server.url, stall_timeout=1, retries=1), batch_size=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        if always:
            with pytest.raises(DataError) as info:
                within(20, lambda: keys_of(loader))
            assert str(info.value) == f"cannot read {url}: no data for 1 s (after 1 retries)"
        else:
            expected = keys_of(build_dataloader(cfg(shards), batch_size=2, seed=1))
            assert within(20, lambda: keys_of(loader)) == expected
            assert loader.stats.retries == 1 and loader.stats.skipped == 0
    assert server.requests[name] == 2
    (line,) = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert line == f"retrying {url} in 0 s (retry 1 of 1): no data for 1 s"
    assert left_running(server.url) == []  # no curl left waiting


@needs_proc
@pytest.mark.parametrize("always", [False, True])
def test_stalled_pipe_command_is_killed_with_its_children(shards, tmp_path, always):
    """``pipe:`` likewise: a command that writes half a shard (or manifest) and then waits on a
    child that never writes is killed, child included, after ``data.stall_timeout`` seconds
    without a byte, and read again; one that always stalls ends in one error naming it."""
    shard, sleepers = shards / "train-000000.tar", tmp_path / "sleepers"
    script = tmp_path / "stall.sh"
    script.write_text(
        f'if [ -e {tmp_path}/stalled ]; then exec cat "$1"; fi\n'
        + ("" if always else f"touch {tmp_path}/stalled\n")
        + f'head -c {shard.stat().st_size // 2} "$1"\n'
        + f"sleep 60 &\necho $! >> {sleepers}\nwait\n"
    )
    location = f"pipe:sh {script} {shard}"
    options = {"manifest": str(shards / "manifest.json"), "stall_timeout": 1, "retries": 1}
    loader = build_dataloader(cfg(location, **options), batch_size=2, shuffle=False)
    if always:
        with pytest.raises(DataError) as info:
            within(20, lambda: keys_of(loader))
        assert str(info.value) == f"cannot read {location}: no data for 1 s (after 1 retries)"
        options["manifest"] = manifest = f"pipe:sh {script} {shards}/manifest.json"
        with pytest.raises(DataError, match=rf"^cannot read {manifest}: no data for 1 s \("):
            within(20, lambda: build_dataloader(cfg(location, **options), batch_size=2))
    else:
        assert within(20, lambda: keys_of(loader)) == KEYS[:3]
        assert loader.stats.retries == 1
    pids = tuple(int(pid) for pid in sleepers.read_text().split())
    assert len(pids) == (4 if always else 1)
    assert left_running(str(script), pids) == []


def test_brace_lists_local_and_url(shards, server):
    local = build_dataloader(cfg(f"{shards}/train-{{000004..000007}}.tar"), batch_size=4,
                             shuffle=False)  # fmt: skip
    assert local.dataset.shards[0] == str(shards / "train-000004.tar")  # the fast local reader
    assert keys_of(local) == KEYS[12:]
    path = f"{server.url}/train-{{000000..000001}}.tar::{server.url}/train-000005.tar"
    assert keys_of(build_dataloader(cfg(path), batch_size=4, shuffle=False)) == (
        KEYS[:6] + KEYS[15:18]
    )


def test_ranks_and_workers_split_a_stream_without_overlap_or_loss(shards, server):
    per_rank = []
    for rank in (0, 1):
        loader = build_dataloader(cfg(server.url), batch_size=2, rank=rank, world_size=2,
                                  num_workers=2, resampled=False, seed=5)  # fmt: skip
        keys = keys_of(loader)
        assert len(keys) == len(set(keys)) == 12
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set(KEYS)


def test_resampled_stream_is_endless(shards, server):
    loader = build_dataloader(cfg(server.url, resampled=True), batch_size=8, seed=2)
    keys = keys_of(loader, limit=6)  # 48 draws from 24 samples
    assert len(keys) == 48 and set(keys) <= set(KEYS) and len(set(keys)) < 48


def test_resume_mid_epoch_on_a_stream_equals_uninterrupted(shards, server):
    def loader(path):
        return build_dataloader(cfg(path), batch_size=2, num_workers=2, seed=4, epoch=1)

    whole = keys_of(loader(server.url))
    first = loader(server.url)
    head = keys_of(first, limit=5)
    state = first.state_dict()
    resumed = loader(server.url)
    assert resumed.load_state_dict(state) is None
    assert head + keys_of(resumed) == whole
    # the position names shards, not where they are: a run moved from disk to HTTP resumes too
    local = loader(shards)
    head = keys_of(local, limit=3)
    resumed = loader(server.url)
    assert resumed.load_state_dict(local.state_dict()) is None
    assert head + keys_of(resumed) == whole


def test_where_the_manifest_is_read():
    from ldmkit.data.location import locate

    s3 = "pipe:aws s3 cp s3://bucket/fm/train-{000000..000127}.tar -"
    where = locate(s3)
    assert where.manifest == "pipe:aws s3 cp s3://bucket/fm/manifest.json -"
    assert len(where.listed) == 128 and where.listed["train-000127.tar"].endswith("127.tar -")
    assert locate("https://h/fm/").manifest == "https://h/fm/manifest.json"
    assert locate("https://h/fm").shard("test-000001.tar") == "https://h/fm/test-000001.tar"
    assert locate(s3, manifest="https://h/m.json").manifest == "https://h/m.json"
    with pytest.raises(DataError, match=r"data.path=s3://bucket/fm: .*pipe:aws s3 cp"):
        locate("s3://bucket/fm")
    with pytest.raises(DataError, match=r"data.manifest"):
        locate("pipe:my-reader --all")


@pytest.mark.slow
def test_training_from_a_stream_equals_training_from_disk(tmp_path):
    """Stage 2 through ``ldmkit train`` (2 DataLoader workers, shuffling, validation) from HTTP
    — one shard's connection dropped half-way once, the run stopped at step 3 and restarted —
    ends bitwise equal, data position included, to the same run from disk."""
    from tests.training import faults

    shards = faults.make_shards(tmp_path / "data")
    reference = tmp_path / "disk"
    assert faults.train_in_process(faults.stage_args(2, shards, reference)) == 0
    step = faults.checkpoint_steps(reference)[-1]
    run_dir = tmp_path / "http"
    with serve(shards) as server:
        server.drops["train-000001.tar"] = 1
        for stop in (3, step):
            args = faults.stage_args(2, server.url, run_dir, f"trainer.max_steps={stop}",
                                     "data.retry_delay=0")  # fmt: skip
            assert faults.train_in_process(args) == 0
    assert server.drops["train-000001.tar"] == 0 and server.requests["val-000000.tar"] > 0
    expected = faults.final_contents(reference, step)
    assert faults.differences(expected, faults.final_contents(run_dir, step)) == []


def test_data_info_and_verify_read_a_served_folder_and_a_pipe_list(shards, tmp_path):
    """`ldmkit data info|verify` take what data.path takes: a folder's URL (each shard streamed
    and hashed, a dropped transfer retried rather than reported) and a pipe: shard list."""
    import shutil

    from tests.conftest import ldmkit_cli

    served = tmp_path / "served"
    shutil.copytree(shards, served)
    with serve(served) as httpd:
        out = ldmkit_cli("data", "info", httpd.url)
        assert out.returncode == 0, out.stderr
        assert "split train: 24 samples in 8 shards" in out.stdout
        out = ldmkit_cli("data", "verify", "--no-progress", httpd.url)
        assert (out.returncode, out.stdout.strip()) == (0, "8 of 8 shards match the manifest"), out.stderr
        damaged = served / "train-000002.tar"
        data = bytearray(damaged.read_bytes())
        data[600] ^= 1  # one bit: the same size, another checksum
        damaged.write_bytes(bytes(data))
        httpd.drops["train-000005.tar"] = 1
        out = ldmkit_cli("data", "verify", "--no-progress", httpd.url)
        assert out.returncode == 1
        assert out.stderr.splitlines()[-1] == "train: train-000002.tar checksum differs from the manifest"
        assert (f"retrying {httpd.url}/train-000005.tar in 1 s (retry 1 of 5): curl exited with status 18 "
                "(the transfer was cut short)") in out.stderr  # retried, then whole
        assert out.stdout.strip() == "7 of 8 shards match the manifest"
        assert httpd.requests["train-000005.tar"] == 3  # once, then dropped and read again
    listed = "pipe:cat " + str(served) + "/train-{000000..000001}.tar"
    out = ldmkit_cli("data", "verify", "--no-progress", listed, "--manifest", str(served / "manifest.json"))
    assert (out.returncode, out.stdout.strip()) == (0, "2 of 2 shards match the manifest"), out.stderr


def test_a_pipe_command_that_cannot_run_fails_at_once(shards, tmp_path):
    """The shell's 127 (command not found) and 126 (cannot run) are answers, not broken
    transfers: one error naming the command, without the retries' pauses; any other failing
    status is retried as before."""
    script = tmp_path / "not_executable.sh"
    script.write_text("cat \"$1\"\n")  # no x bit: the shell answers 126
    manifest = str(shards / "manifest.json")  # read from disk: the shard's command fails
    for command, status in ((f"pipe:no-such-command-ldmkit {shards}/train-000000.tar", 127),
                            (f"pipe:{script} {shards}/train-000000.tar", 126)):  # fmt: skip
        start = time.monotonic()
        with pytest.raises(DataError) as info:
            keys_of(build_dataloader(loader_cfg(command, retry_delay=5.0, manifest=manifest), batch_size=2))
        assert time.monotonic() - start < 5.0  # no retry pause
        message = str(info.value)
        assert f"cannot read {command}: the command exited with status {status} (" in message
        assert "retries" not in message
    with pytest.raises(DataError, match=r"status 3 \(after 1 retries\)"):
        keys_of(build_dataloader(cfg(f"pipe:exit 3 # {shards}/train-000000.tar", retries=1, manifest=manifest),
                                 batch_size=2))
