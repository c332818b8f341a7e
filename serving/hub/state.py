"""What the hub keeps in `--state-dir`: datasets, models and evaluations as one JSON file each, written
atomically, each with an eTag that changes on every write. The hub's ingress is the only writer.

    <state-dir>/datasets/<name>.json        the dataset as the API answers it
    <state-dir>/models/<name>.json          the model (status, trainingParameters, modelPerformance, ...)
    <state-dir>/evaluations/<model>/<name>.json
    <state-dir>/jobs/<model>/               a training's data, outputs and progress.json
    <state-dir>/mlflow.db                   the Model Registry, unless a tracking URI is in force
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from serving.batch.files import atomic_file

KINDS = ("datasets", "models")
_LONG = 200  # a longer name's file is named by its first characters and a hash: "<name>.json" and the temp name
#              beside it (".<name>.json.<pid>.tmp") must fit the file system's 255 bytes


def now() -> str:
    """The API's date-time format (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_name(name: str) -> str:
    """The file (or folder) name of a record's name: the name itself, or for a long one its start and a hash."""
    if len(name) <= _LONG:
        return name
    return f"{name[:_LONG - 17]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


class Store:
    """Records by kind and name; reads and writes under one lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for kind in (*KINDS, "evaluations", "jobs"):
            (self.root / kind).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    def _path(self, kind: str, name: str, model: str | None = None) -> Path:
        """Where a record is. Names reach here checked by the one name rule (serving.hub.api.resource_name)."""
        folder = self.root / kind if model is None else self.root / kind / file_name(model)
        return folder / f"{file_name(name)}.json"

    def get(self, kind: str, name: str, model: str | None = None) -> dict[str, Any] | None:
        path = self._path(kind, name, model)
        with self.lock:
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                return None

    def put(self, kind: str, record: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        """Write `record` (its "name" names the file) with a fresh eTag and updatedDateTime."""
        record = {**record, "updatedDateTime": now(), "eTag": f'"{secrets.token_hex(8)}"'}
        path = self._path(kind, record["name"], model)
        with self.lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:
                json.dump(record, f, indent=1)
        return record

    def update(self, kind: str, name: str, model: str | None = None, **changes: Any) -> dict[str, Any] | None:
        with self.lock:
            record = self.get(kind, name, model)
            return None if record is None else self.put(kind, {**record, **changes}, model)

    def delete(self, kind: str, name: str, model: str | None = None) -> bool:
        with self.lock:
            try:
                self._path(kind, name, model).unlink()
                return True
            except FileNotFoundError:
                return False

    def all(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        """Every record of a kind, oldest first (creation time, then name)."""
        folder = self.root / kind if model is None else self.root / kind / file_name(model)
        with self.lock:
            records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        return sorted(records, key=lambda r: (r.get("createdDateTime", ""), r["name"]))

    def job_dir(self, model: str) -> Path:
        return self.root / "jobs" / file_name(model)

    def progress(self, model: str) -> dict[str, Any]:
        """What a running training last wrote about itself (jobs/<model>/progress.json)."""
        try:
            return json.loads((self.job_dir(model) / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


def write_progress(job_dir: Path, **values: Any) -> None:
    """A training's own report of where it is (read by the ingress on GET)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(job_dir / "progress.json") as f:
        json.dump({**values, "at": now()}, f)
