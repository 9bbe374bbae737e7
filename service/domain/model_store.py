"""The versioned model store, in the layout TF Serving reads.

Layout under ``<data_dir>/models``::

    <name>/<version>/           saved_model.pb + variables/ (from model.export),
                                model.keras, fitserve.json
    <name>/aliases.json         {"stable": 3, ...}
    <name>/.staging/<job_id>/   a version being written; renamed into place when whole
    <name>/.jobs/<job_id>       the version a job published (publishing is idempotent)

The store alone is enough to rebuild the registry: Redis holds no model state. Only
publishing creates a model's folder: a call about a model that does not exist (an alias,
a version to delete) answers NOT_FOUND and leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.domain.files import read_json, write_json_atomic
from service.domain.resource_names import check_alias, check_name
from service.errors import FailedPrecondition, NotFound, shown

METADATA_FILE = "fitserve.json"
KERAS_FILE = "model.keras"
STABLE = "stable"


class ModelStore:
    """Publishes versions atomically and resolves names, versions and aliases."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def staging_dir(self, name: str, job_id: str) -> Path:
        """An empty folder to write a version into before it is published."""
        path = self._dir(name) / ".staging" / job_id
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def publish(self, name: str, job_id: str, staging: Path) -> int:
        """Rename a staged version into place under the next number; once per job."""
        with self._lock(name, create=True):
            marker = self._dir(name) / ".jobs" / job_id
            if marker.exists():
                shutil.rmtree(staging, ignore_errors=True)
                return int(marker.read_text())
            version = max(self.versions(name), default=0) + 1
            os.replace(staging, self._dir(name) / str(version))
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(str(version))
            return version

    def published_version(self, name: str, job_id: str) -> int | None:
        """The version a job published, if it did."""
        marker = self._dir(name) / ".jobs" / job_id
        return int(marker.read_text()) if marker.exists() else None

    def models(self) -> list[str]:
        """Names of models with at least one version, sorted."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Published versions of a model, ascending."""
        folder = self._dir(name)
        if not folder.exists():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def resolve(self, name: str, version: int = 0, alias: str = "") -> int:
        """The version a request means: exact, by alias, or `stable` else the latest."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"model {name!r} not found; train it first or check ListModels")
        if version:
            if version not in versions:
                raise NotFound(f"model {name!r} has no version {version}; it has {_span(versions)}")
            return version
        aliases = self.aliases(name)
        if alias:
            if alias not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise NotFound(f"model {name!r} has no alias {shown(alias)}; its aliases: {known}")
            return aliases[alias]
        return aliases.get(STABLE, versions[-1])

    def path(self, name: str, version: int) -> Path:
        """Folder of a published version."""
        return self._dir(name) / str(version)

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        """The version's fitserve.json."""
        path = self.path(name, version) / METADATA_FILE
        if not path.exists():
            raise NotFound(f"model {name!r} has no version {version}")
        data: dict[str, Any] = read_json(path)
        return data

    def update_metadata(self, name: str, version: int, **fields: Any) -> None:
        """Merge fields into a version's fitserve.json (evaluations, for example)."""
        with self._lock(name):
            data = self.metadata(name, version) | fields
            write_json_atomic(self.path(name, version) / METADATA_FILE, data)

    def aliases(self, name: str) -> dict[str, int]:
        """Alias -> version."""
        path = self._dir(name) / "aliases.json"
        return {k: int(v) for k, v in read_json(path).items()} if path.exists() else {}

    def set_alias(self, name: str, alias: str, version: int) -> int:
        """Point an alias at a version; returns the version it pointed at before (0: new)."""
        check_alias(alias)
        with self._lock(name):
            if version not in self.versions(name):
                raise NotFound(f"model {name!r} has no version {version}")
            aliases = self.aliases(name)
            previous = aliases.get(alias, 0)
            write_json_atomic(self._dir(name) / "aliases.json", aliases | {alias: version})
            return previous

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias."""
        with self._lock(name):
            aliases = self.aliases(name)
            if alias not in aliases:
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            del aliases[alias]
            write_json_atomic(self._dir(name) / "aliases.json", aliases)

    def delete_version(self, name: str, version: int) -> None:
        """Delete a version no alias points at."""
        with self._lock(name):
            if version not in self.versions(name):
                raise NotFound(f"model {name!r} has no version {version}")
            pointing = sorted(a for a, v in self.aliases(name).items() if v == version)
            if pointing:
                raise FailedPrecondition(
                    f"version {version} of {name!r} is aliased as {', '.join(pointing)}; "
                    "move or delete the aliases first"
                )
            trash = self._dir(name) / f".deleting-{version}"
            os.replace(self.path(name, version), trash)
            shutil.rmtree(trash)

    def _dir(self, name: str) -> Path:
        check_name(name, "model_name", "model name")
        return self.root / name

    @contextmanager
    def _lock(self, name: str, *, create: bool = False) -> Iterator[None]:
        """Serialize writers of one model across processes (publish, aliases, delete);
        NOT_FOUND for a model without versions, unless ``create`` (publishing)."""
        folder = self._dir(name)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not self.versions(name):
            raise NotFound(f"model {name!r} not found; train it first or check ListModels")
        with (folder / ".lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _span(versions: list[int]) -> str:
    return (
        f"versions {versions[0]}..{versions[-1]}" if len(versions) > 1 else f"version {versions[0]}"
    )
