"""Where a prepared dataset is (``data.path``, ``data.manifest``): a local folder, the same
folder served over HTTP(S), or a list of shards — local, URLs or ``pipe:`` commands — written
with brace expansion (``braceexpand``) and ``::`` between lists, as webdataset expands them.

    data/fashion_mnist                                          a folder (the fast local reader)
    https://host/fashion_mnist                                  that folder over HTTP(S)
    https://host/fm/train-{000000..000015}.tar                  a shard list
    pipe:aws s3 cp s3://bucket/fm/train-{000000..000127}.tar -  a command per shard (its stdout)
    data/fashion_mnist/train-{000000..000003}.tar               a local shard list

The manifest is ``data.manifest`` when given (a path, URL or ``pipe:`` command), else
``manifest.json`` in the same place: in the folder, or in place of the shard name (the last
``NAME.tar`` of the first entry of a list: ``pipe:aws s3 cp s3://bucket/fm/manifest.json -``).
A shard list selects shards of the splits they belong to; a split none of whose shards is
listed is read whole from the same place (its names put in place of the shard name likewise).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from ldmkit.data.errors import DataError
from ldmkit.data.manifest import MANIFEST, Manifest, read_manifest
from ldmkit.data.remote import Retry, fetch, scheme_of, streamable
from ldmkit.data.shards import ShardInfo

# a shard's name inside a location: the last NAME.tar not followed by more of a path
_SHARD_NAME = re.compile(r"[^\s/'\"]+\.tar(?=$|[\s'\"?#;|&)])")


@dataclass(frozen=True)
class Location:
    """A prepared dataset's place: its shards are ``prefix + name + suffix`` (or the
    ``listed`` locations), its manifest is at ``manifest``."""

    text: str  # data.path as given, for messages
    prefix: str
    suffix: str = ""
    manifest: str = ""
    listed: dict[str, str] | None = None  # shard name -> location, for a shard list
    remote: bool = False  # read through webdataset's gopen; else local files
    folder: Path | None = None  # a local folder (the "not prepared yet" hint names it)
    explicit_manifest: bool = field(default=False, compare=False)

    def shard(self, name: str) -> str:
        if self.listed and name in self.listed:
            return self.listed[name]
        return f"{self.prefix}{name}{self.suffix}"

    def shards(self, manifest: Manifest, split: str) -> list[tuple[ShardInfo, str]]:
        """The shards of ``split`` to read, with where each one is."""
        infos = {shard.name: shard for shard in manifest.split(split).shards}
        if self.listed:
            known = {shard.name for s in manifest.splits.values() for shard in s.shards}
            for name in self.listed:
                if name not in known:
                    raise DataError(
                        f"data.path={self.text} lists {name}, which {self.manifest} does not list"
                    )
            chosen = [name for name in self.listed if name in infos]
            if chosen:
                return [(infos[name], self.listed[name]) for name in chosen]
        return [(info, self.shard(name)) for name, info in infos.items()]

    def read_manifest(self, *, source: str | None = None, retry: Retry | None = None) -> Manifest:
        """The manifest (``source``: the prepare command's source, for the "prepare it" hint)."""
        if not self.remote and not self.explicit_manifest:
            return read_manifest(Path(self.manifest).parent, source=source)
        if scheme_of(self.manifest):
            return _fetch_manifest(self.manifest, retry or Retry())
        try:
            data = Path(self.manifest).read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read data.manifest={self.manifest}: {exc}") from exc
        return _parse_manifest(data, self.manifest)


def verify_shards(location: Location, manifest: Manifest, *, progress: bool = False) -> tuple[int, list[str]]:
    """Check the size and sha256 of every shard ``location`` names against ``manifest``
    (streamed ones hashed as they arrive, retried like a read); returns how many shards were
    checked and the problems found, one line each."""
    from tqdm.auto import tqdm

    from ldmkit.data.remote import stream_digest
    from ldmkit.data.shards import sha256_of

    shards = [(split, info, where) for split in manifest.splits for info, where in location.shards(manifest, split)]
    problems = []
    for split, info, where in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        if location.remote:
            size, digest = stream_digest(where)
        elif not os.path.isfile(where):
            problems.append(f"{split}: {info.name} is missing")
            continue
        else:
            size, digest = os.path.getsize(where), None
        if size != info.bytes:
            problems.append(f"{split}: {info.name} has {size} bytes, expected {info.bytes}")
        elif (digest or sha256_of(where)) != info.sha256:
            problems.append(f"{split}: {info.name} checksum differs from the manifest")
    return len(shards), problems


def verify(directory: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """Check every shard's size and sha256 in a prepared folder against its manifest; returns
    the problems found (:func:`verify_shards` takes URLs and shard lists too)."""
    manifest = manifest or read_manifest(directory)
    return verify_shards(locate(str(Path(directory).resolve())), manifest)[1]


@functools.lru_cache(maxsize=8)
def _fetch_manifest(location: str, retry: Retry) -> Manifest:
    """Fetched once per process: composing a config and building its loaders read it often."""
    return _parse_manifest(fetch(location, retry), location)


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        content = json.loads(data)
    except ValueError as exc:
        raise DataError(f"{where} is not JSON: {exc}") from exc
    return Manifest.from_json(content, where)


def locate(path: str, *, manifest: str | None = None, base: Path | None = None) -> Location:
    """Where ``data.path`` (and ``data.manifest``, if given) point; relative local paths are
    taken from ``base`` (default: the current directory)."""
    text = str(path)
    base = base or Path.cwd()
    scheme = scheme_of(text)
    if scheme == "file":
        text, scheme = url2pathname(urlparse(text).path), ""
    if scheme and not streamable(scheme):
        hint = (
            f"; stream it through a command: data.path='pipe:aws s3 cp {text.rstrip('/')}/"
            "train-{000000..000015}.tar -'"
            if scheme in ("s3", "gs", "az", "abfs")
            else ""
        )
        raise DataError(
            f"data.path={text}: cannot read {scheme}:// locations (readable: local paths, "
            f"file://, http(s)://, pipe:CMD){hint}"
        )
    remote = bool(scheme)
    if not remote:
        text = os.path.expanduser(text)
        if not Path(text).is_absolute():
            text = str(base / text)
    explicit = manifest is not None
    if explicit:
        manifest = str(manifest)
        if not scheme_of(manifest):
            manifest = os.path.expanduser(manifest)
            manifest = manifest if Path(manifest).is_absolute() else str(base / manifest)

    if remote or "{" in text or "::" in text:
        from webdataset.shardlists import expand_urls  # webdataset imports torch: not for a folder

        entries = expand_urls(text)
    else:
        entries = [text]
    names = [_SHARD_NAME.findall(entry) for entry in entries]
    if all(names) and (remote or all(entry.endswith(".tar") for entry in entries)):
        return _shard_list(str(path), entries, manifest, remote)
    if scheme == "pipe" or len(entries) > 1:
        raise DataError(
            f"data.path={path}: name the shards in it (e.g. pipe:aws s3 cp "
            "s3://bucket/fm/train-{000000..000015}.tar -), or give data.path a folder; "
            "set data.manifest= when manifest.json is not in place of a shard's name"
        )
    if remote:
        prefix = text.rstrip("/") + "/"
        return Location(str(path), prefix, manifest=manifest or prefix + MANIFEST, remote=True,
                        explicit_manifest=explicit)  # fmt: skip
    folder = Path(text)
    return Location(str(path), f"{folder}{os.sep}", manifest=manifest or str(folder / MANIFEST),
                    folder=folder, explicit_manifest=explicit)  # fmt: skip


def _shard_list(text: str, entries: list[str], manifest: str | None, remote: bool) -> Location:
    listed: dict[str, str] = {}
    for entry in entries:
        name = _SHARD_NAME.findall(entry)[-1]
        if name in listed:
            raise DataError(f"data.path={text} lists {name} twice")
        listed[name] = entry
    first = entries[0]
    match = list(_SHARD_NAME.finditer(first))[-1]
    prefix, suffix = first[: match.start()], first[match.end() :]
    return Location(text, prefix, suffix, manifest=manifest or f"{prefix}{MANIFEST}{suffix}",
                    listed=listed, remote=remote,
                    explicit_manifest=manifest is not None)  # fmt: skip
