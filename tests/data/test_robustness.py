"""Damaged data is skipped, counted and reported with shard and key; training goes on."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest

from ldmkit.data import (
    DataError,
    SourceNotFoundError,
    build_dataloader,
    build_dataset,
    prepare,
)
from ldmkit.data.sources import emoji, fashion_mnist, tuxpaint

from .conftest import loader_cfg


def rewrite_shard(path, change) -> None:
    """Rewrite a tar with ``change(name, data) -> bytes`` applied to each member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def keys_of(path) -> list[str]:
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))


def all_keys(loader) -> list[str]:
    return [key for batch in loader for key in batch["__key__"]]


def test_an_image_member_that_is_no_image_says_so_without_a_buffer_address(prepared):
    """Before: ``UnidentifiedImageError: cannot identify image file <_io.BytesIO object at
    0x7f…>``: the address of an in-memory buffer, which names nothing."""
    out, _ = prepared
    shard = out / "train-000000.tar"
    victim = keys_of(shard)[0]
    rewrite_shard(shard, lambda name, data: b"<html>" if name == f"{victim}.png" else data)
    loader = build_dataloader(loader_cfg(out), batch_size=4, num_workers=0)
    all_keys(loader)
    (event,) = loader.stats.events
    assert event.key == victim
    assert event.reason == "ValueError: not an image PIL can identify (6 bytes)"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_skipped_counted_and_named(prepared, num_workers, caplog):
    out, _ = prepared
    shard = out / "train-000001.tar"
    victim = keys_of(shard)[2]
    rewrite_shard(
        shard, lambda name, data: data[: len(data) // 2] if name == f"{victim}.png" else data
    )
    loader = build_dataloader(loader_cfg(out), batch_size=4, num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        keys = all_keys(loader)
    assert victim not in keys and len(keys) == 23 and len(set(keys)) == 23
    assert loader.stats.counts == {"corrupt": 1}
    assert loader.stats.samples == 23
    (event,) = loader.stats.events
    assert (event.kind, event.key, event.shard) == ("corrupt", victim, str(shard))
    if num_workers == 0:  # a worker's log goes to its own stderr, not to caplog
        assert any(
            victim in r.getMessage() and str(shard) in r.getMessage() for r in caplog.records
        )
    # the map-style view skips it too
    dataset = build_dataset(loader_cfg(out))
    assert len(dataset) == 23 and dataset.stats.counts == {"corrupt": 1}


def test_truncated_tar_keeps_what_came_before(prepared):
    out, _ = prepared
    shard = out / "train-000003.tar"
    keys = keys_of(shard)
    data = shard.read_bytes()
    # cut inside the third sample's image member (members per sample: cls, json, png, txt)
    with tarfile.open(shard) as tar:
        png = next(m for m in tar.getmembers() if m.name == f"{keys[2]}.png")
    shard.write_bytes(data[: png.offset_data + png.size // 2])
    loader = build_dataloader(loader_cfg(out), batch_size=4, num_workers=2)
    seen = all_keys(loader)
    assert keys[0] in seen and keys[1] in seen
    assert keys[2] not in seen and keys[3] not in seen
    assert len(seen) == 22
    assert loader.stats.counts == {"truncated": 1}
    (event,) = loader.stats.events
    assert event.key == keys[2] and event.shard == str(shard)


def test_tar_cut_between_samples_is_noticed(prepared):
    out, _ = prepared
    shard = out / "train-000002.tar"
    keys = keys_of(shard)
    with tarfile.open(shard) as tar:
        start = next(m for m in tar.getmembers() if m.name.startswith(keys[2])).offset
    shard.write_bytes(shard.read_bytes()[:start])  # ends cleanly after sample 1's last member
    loader = build_dataloader(loader_cfg(out), batch_size=4)
    seen = all_keys(loader)
    assert keys[0] in seen and len(seen) == 21
    # without the end-of-archive marker the last sample read cannot be trusted to be whole
    assert loader.stats.counts == {"truncated": 1}
    assert loader.stats.events[0].key == keys[1]


def test_unreadable_and_missing_shards_are_skipped(prepared):
    out, _ = prepared
    (out / "train-000000.tar").write_bytes(b"this is not a tar file" * 40)
    (out / "train-000004.tar").unlink()
    loader = build_dataloader(loader_cfg(out), batch_size=4)
    assert len(all_keys(loader)) == 16
    assert loader.stats.counts == {"unreadable_shard": 2}
    assert {e.shard.rsplit("/", 1)[1] for e in loader.stats.events} == {
        "train-000000.tar",
        "train-000004.tar",
    }
    assert all(e.key is None for e in loader.stats.events)


def test_no_valid_sample_is_a_clear_error(prepared):
    out, _ = prepared
    for shard in out.glob("train-*.tar"):
        rewrite_shard(shard, lambda name, data: b"garbage" if name.endswith(".png") else data)
    with pytest.raises(DataError, match=r"no valid sample in split 'train'.*24 corrupt"):
        list(build_dataloader(loader_cfg(out), batch_size=4, num_workers=2))
    with pytest.raises(DataError, match="no valid sample"):
        next(iter(build_dataloader(loader_cfg(out), batch_size=4, resampled=True)))
    with pytest.raises(DataError, match="no valid sample"):
        build_dataset(loader_cfg(out))


def test_missing_prepared_folder_says_how_to_prepare(tmp_path):
    cfg = {"source": "semantic_scenes", "path": str(tmp_path / "nothing"),
           "prepare": {"num_classes": 5}}  # fmt: skip
    with pytest.raises(SourceNotFoundError) as info:
        build_dataloader(cfg, batch_size=2)
    assert f"ldmkit data prepare semantic_scenes num_classes=5 out={tmp_path / 'nothing'}" in str(
        info.value
    )


def test_unknown_split_and_config_key(prepared):
    out, _ = prepared
    with pytest.raises(DataError, match="split 'test' is not in this dataset.*it has: train"):
        build_dataloader(loader_cfg(out), batch_size=2, split="test")
    with pytest.raises(DataError, match="unknown data config key 'image_sise'"):
        build_dataloader({**loader_cfg(out), "image_sise": 3}, batch_size=2)


def test_missing_sources_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "none"))
    with pytest.raises(SourceNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion_mnist", tmp_path / "o", download=False, progress=False)
    monkeypatch.setattr(tuxpaint, "DEBIAN_DIR", str(tmp_path / "none"))
    with pytest.raises(
        SourceNotFoundError,
        match="apt-get install --no-install-recommends tuxpaint-stamps-default",
    ):
        prepare("tuxpaint", tmp_path / "o", progress=False)
    monkeypatch.setattr(emoji, "candidate_dirs", lambda: [tmp_path / "none"])
    with pytest.raises(SourceNotFoundError, match="npm install .*emoji-datasource-google"):
        prepare("emoji", tmp_path / "o", progress=False)
    with pytest.raises(SourceNotFoundError, match="is not a folder"):
        prepare("image_folder", tmp_path / "o", path=str(tmp_path / "none"), progress=False)
    with pytest.raises(SourceNotFoundError, match="needs path=DIR"):
        prepare("image_folder", tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="unknown option 'colour' for source 'emoji'"):
        prepare("emoji", tmp_path / "o", colour=1, progress=False)


def craft_size_claim(path, member: str, claim: int, fmt: int) -> None:
    """Rewrite the tar ``path`` with ``member``'s header claiming ``claim`` bytes (its real
    bytes, and every member after it, follow unchanged), as a crafted shard would."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = bytearray()
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = claim if name == member else len(data)
        out += info.tobuf(format=fmt) + data + b"\0" * (-len(data) % 512)
    path.write_bytes(bytes(out + b"\0" * 1024))


@pytest.mark.parametrize(
    "claim, fmt",
    [(2**40, tarfile.GNU_FORMAT), (2**80, tarfile.GNU_FORMAT), (2**80, tarfile.PAX_FORMAT)],
    ids=["1TB", "2^80", "2^80-pax"],
)
def test_member_claiming_more_than_the_file_holds_ends_the_shard(prepared, claim, fmt, caplog):
    """Before: MemoryError (1 TB) or OverflowError (2^80) out of the loader."""
    out, _ = prepared
    shard = out / "train-000001.tar"
    keys = keys_of(shard)
    craft_size_claim(shard, f"{keys[2]}.png", claim, fmt)
    loader = build_dataloader(loader_cfg(out), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        seen = all_keys(loader)
    assert keys[0] in seen and keys[1] in seen and keys[2] not in seen and keys[3] not in seen
    assert len(seen) == 22
    assert loader.stats.counts == {"truncated": 1}
    (event,) = loader.stats.events
    assert (event.key, event.shard) == (keys[2], str(shard))
    assert f"member {keys[2]}.png claims {claim} bytes" in event.reason
    (record,) = [r for r in caplog.records if str(shard) in r.getMessage()]
    assert f"{keys[2]}.png claims" in record.getMessage()


@pytest.mark.parametrize(
    "record",
    [b"0 size=1\n", b"x size=1\n", b"11 size=-5\n", b"99 size=1\n", b"11 path=\xff\xfe\n"],
    ids=["zero-length", "no-length", "negative-size", "past-the-end", "not-utf8"],
)
def test_damaged_pax_header_ends_the_shard(tmp_path, record):
    """Before: a ValueError out of the reader (or, for a 0 length, a loop without end)."""
    from ldmkit.data.shards import iter_shard
    from ldmkit.data.stats import DataStats

    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    body = tarfile.TarInfo("a.cls")
    body.size = 1
    tar = tmp_path / "bad.tar"
    tar.write_bytes(pax.tobuf() + record.ljust(512, b"\0") + body.tobuf() + b"1".ljust(1536, b"\0"))
    stats = DataStats()
    assert list(iter_shard(str(tar), stats)) == []
    assert stats.counts == {"unreadable_shard": 1}
    assert "damaged pax header" in stats.events[0].reason
