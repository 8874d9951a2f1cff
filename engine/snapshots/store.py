"""Where snapshots live: the :class:`SnapshotStore` interface and the local-directory store.

A snapshot is two objects: the Avro container file and its manifest (JSON). A store publishes
the file first and the manifest second, each atomically, so a manifest that can be listed always
describes a complete file; deleting goes the other way round (manifest, then file).

:class:`LocalDirectoryStore` keeps ``<root>/<org>/<entity>/<watermark>-<epoch>.avro`` and
``<watermark>-<epoch>.manifest.json``; each is written to a temporary file in the same directory,
flushed to disk and renamed over its final name. An object store (S3, GCS) can implement the same
interface: ``put`` uploads the file, then the manifest.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

import orjson

from engine.config import Settings
from engine.snapshots.exceptions import SnapshotError, SnapshotNotFound

log = logging.getLogger("fieldsync.snapshots")

FORMAT_VERSION = 1
ORG_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
ENTITY_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SNAPSHOT_ID = re.compile(r"^[0-9]{1,19}-[A-Za-z0-9_-]{1,64}$")
MANIFEST_SUFFIX = ".manifest.json"
FILE_SUFFIX = ".avro"


@dataclass(frozen=True)
class KafkaOffsets:
    """Committed offsets of the projector group on the entity's change topics when the snapshot
    was read (read before it: replaying from them onto the snapshot misses nothing)."""

    group: str
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)  # topic → partition → offset
    note: str | None = None  # why ``offsets`` is empty, when it is


@dataclass(frozen=True)
class Manifest:
    """Everything about one snapshot file (see ``docs/snapshots.md``)."""

    org: str
    entity: str
    watermark: int
    epoch: str  # staging epoch (fieldsync_control.orgs.staging_epoch)
    horizon: int  # the entity's retention horizon when the snapshot was read
    keys: list[str]
    columns: list[dict[str, str]]  # [{"name", "type"}], staging types, table order
    schema: dict[str, Any]  # the file's Avro schema
    rows: int
    size: int  # bytes
    sha256: str
    codec: str
    kafka: KafkaOffsets
    created_at: datetime
    format: int = FORMAT_VERSION

    @property
    def id(self) -> str:
        return snapshot_id(self.watermark, self.epoch)

    @property
    def file_name(self) -> str:
        return self.id + FILE_SUFFIX

    @property
    def manifest_name(self) -> str:
        return self.id + MANIFEST_SUFFIX

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["id"] = self.id
        document["file"] = self.file_name
        document["created_at"] = self.created_at.isoformat()
        return document

    def dumps(self) -> bytes:
        return orjson.dumps(self.to_json(), option=orjson.OPT_INDENT_2) + b"\n"

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Manifest:
        values = {k: v for k, v in document.items() if k not in ("id", "file")}
        values["kafka"] = KafkaOffsets(**values["kafka"])
        values["created_at"] = datetime.fromisoformat(values["created_at"])
        return cls(**values)


def snapshot_id(watermark: int, epoch: str) -> str:
    value = f"{watermark}-{epoch}"
    if not SNAPSHOT_ID.match(value):
        raise SnapshotError(f"epoch {epoch!r} cannot name a snapshot file")
    return value


def _check_names(org: str, entity: str) -> None:
    if not ORG_NAME.match(org) or not ENTITY_NAME.match(entity):
        raise SnapshotError(f"not an org/entity name: {org!r}/{entity!r}")


@runtime_checkable
class SnapshotStore(Protocol):
    """Stores snapshot files with their manifests; newest = latest ``created_at``."""

    def put(self, manifest: Manifest, source: Path) -> Manifest:
        """Publish ``source`` (taken over: moved or copied, then removed) under ``manifest``."""
        ...

    def open(self, org: str, entity: str, snapshot: str) -> BinaryIO:
        """The file of snapshot ``snapshot`` (an id); :class:`SnapshotNotFound` if absent."""
        ...

    def get(self, org: str, entity: str, snapshot: str) -> Manifest:
        """The manifest of snapshot ``snapshot``; :class:`SnapshotNotFound` if absent."""
        ...

    def list(self, org: str, entity: str) -> builtins.list[Manifest]:
        """Manifests of the entity's snapshots, newest first."""
        ...

    def delete(self, org: str, entity: str, snapshot: str) -> None:
        """Remove a snapshot (manifest first); absent is fine."""
        ...

    def latest(self, org: str, entity: str) -> Manifest | None:
        """The newest snapshot's manifest, or None."""
        ...

    def entities(self) -> builtins.list[tuple[str, str]]:
        """Every (org, entity) the store holds snapshots of."""
        ...


@runtime_checkable
class LocalFiles(Protocol):
    """A store whose files are on this machine (the gateway serves them with Range support)."""

    def local_path(self, manifest: Manifest) -> Path: ...


class LocalDirectoryStore:
    """Snapshots under one directory: ``<root>/<org>/<entity>/<watermark>-<epoch>.avro``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self.root)!r})"

    def _dir(self, org: str, entity: str) -> Path:
        _check_names(org, entity)
        return self.root / org / entity

    def work_dir(self) -> Path:
        """Where a builder writes a file before ``put`` (same file system: ``put`` renames)."""
        path = self.root / ".incoming"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local_path(self, manifest: Manifest) -> Path:
        return self._dir(manifest.org, manifest.entity) / manifest.file_name

    # -- writing ------------------------------------------------------------------------------
    def put(self, manifest: Manifest, source: Path) -> Manifest:
        directory = self._dir(manifest.org, manifest.entity)
        directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(6)
        temp = directory / f".{manifest.id}.{token}{FILE_SUFFIX}.tmp"
        try:
            try:
                os.replace(source, temp)
            except OSError:  # another file system: copy
                shutil.copyfile(source, temp)
                source.unlink()
            _fsync(temp)
            os.replace(temp, directory / manifest.file_name)
            self._write_manifest(directory, manifest, token)
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(directory)
        return manifest

    def _write_manifest(self, directory: Path, manifest: Manifest, token: str) -> None:
        temp = directory / f".{manifest.id}.{token}{MANIFEST_SUFFIX}.tmp"
        try:
            with temp.open("wb") as out:
                out.write(manifest.dumps())
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, directory / manifest.manifest_name)
        finally:
            temp.unlink(missing_ok=True)

    def delete(self, org: str, entity: str, snapshot: str) -> None:
        directory = self._dir(org, entity)
        _check_id(snapshot)
        (directory / (snapshot + MANIFEST_SUFFIX)).unlink(missing_ok=True)
        (directory / (snapshot + FILE_SUFFIX)).unlink(missing_ok=True)
        for empty in (directory, directory.parent):  # the last snapshot leaves no directory
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                empty.rmdir()

    # -- reading ------------------------------------------------------------------------------
    def open(self, org: str, entity: str, snapshot: str) -> BinaryIO:
        _check_id(snapshot)
        try:
            return (self._dir(org, entity) / (snapshot + FILE_SUFFIX)).open("rb")
        except FileNotFoundError:
            raise SnapshotNotFound(f"no snapshot {snapshot} of {org}.{entity}") from None

    def get(self, org: str, entity: str, snapshot: str) -> Manifest:
        _check_id(snapshot)
        path = self._dir(org, entity) / (snapshot + MANIFEST_SUFFIX)
        manifest = _read_manifest(path)
        if manifest is None:
            raise SnapshotNotFound(f"no snapshot {snapshot} of {org}.{entity}")
        return manifest

    def list(self, org: str, entity: str) -> builtins.list[Manifest]:
        directory = self._dir(org, entity)
        if not directory.is_dir():
            return []
        found = [
            manifest
            for path in directory.glob("*" + MANIFEST_SUFFIX)
            if not path.name.startswith(".")
            and (manifest := _read_manifest(path)) is not None
            and (directory / manifest.file_name).exists()
        ]
        return sorted(found, key=lambda m: (m.created_at, m.watermark), reverse=True)

    def latest(self, org: str, entity: str) -> Manifest | None:
        manifests = self.list(org, entity)
        return manifests[0] if manifests else None

    def entities(self) -> builtins.list[tuple[str, str]]:
        if not self.root.is_dir():
            return []
        return sorted(
            (org_dir.name, entity_dir.name)
            for org_dir in self.root.iterdir()
            if org_dir.is_dir() and ORG_NAME.match(org_dir.name)
            for entity_dir in org_dir.iterdir()
            if entity_dir.is_dir() and ENTITY_NAME.match(entity_dir.name)
        )


def _check_id(snapshot: str) -> None:
    if not SNAPSHOT_ID.match(snapshot):
        raise SnapshotNotFound(f"not a snapshot id: {snapshot!r}")


def _read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.from_json(orjson.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as error:
        log.warning("ignoring unreadable snapshot manifest %s: %s", path, error)
        return None


def _fsync(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune(store: SnapshotStore, org: str, entity: str, keep: int) -> list[Manifest]:
    """Delete all but the ``keep`` newest snapshots of the entity; returns those deleted."""
    if keep < 1:
        raise SnapshotError("keep at least one snapshot")
    doomed: Sequence[Manifest] = store.list(org, entity)[keep:]
    for manifest in doomed:
        store.delete(org, entity, manifest.id)
        log.info("pruned snapshot %s of %s.%s", manifest.id, org, entity)
    return list(doomed)


def snapshot_dir(settings: Settings) -> Path:
    """``FIELDSYNC_SNAPSHOT_DIR``, or ``<data dir>/snapshots``."""
    return settings.snapshot_dir or settings.data_dir / "snapshots"


def default_store(settings: Settings) -> LocalDirectoryStore:
    return LocalDirectoryStore(snapshot_dir(settings))


__all__ = [
    "FORMAT_VERSION",
    "KafkaOffsets",
    "LocalDirectoryStore",
    "LocalFiles",
    "Manifest",
    "SnapshotStore",
    "default_store",
    "prune",
    "snapshot_dir",
    "snapshot_id",
]
