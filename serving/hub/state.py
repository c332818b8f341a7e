"""What the hub keeps: datasets, models and evaluations as JSON documents in one database table, through
SQLAlchemy, each with an eTag that changes on every write; and each training's folder on disk.

    sqlite:///<state-dir>/hub.db      the records (the embedded default)
    --state-db postgresql://...       the records in PostgreSQL, for several hub ingress replicas
    <state-dir>/jobs/<model>/         a training's data and outputs (on the node it ran on)
    <state-dir>/mlflow.db             the Model Registry, unless a tracking URI is in force

The rules that several writers must not break are transactions here, not locks in one process: a name is
created once (the table's key: of two concurrent PUTs exactly one wins), a count quota is checked in the
creating transaction, and an If-Match or status check sees the record it changes (PostgreSQL locks the row,
SQLite takes the write lock at BEGIN). A `--state-dir` of JSON files (before the database) is imported on
first start and its files moved to `<state-dir>/json-before-db/`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (Column, Connection, Engine, MetaData, String, Table, Text, create_engine, event, func,
                        select)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

KINDS = ("datasets", "models", "evaluations")
DIALECTS = ("sqlite", "postgresql")
_LONG = 200  # a longer name's folder is named by its first characters and a hash (the 255-byte file name rule)
_READING = "visionserve_reading"  # the execution option of a connection that only reads
_NONE = ""  # the `model` column of a dataset or a model (only evaluations belong to a model)

_metadata = MetaData()
_records = Table(
    "hub_records", _metadata,
    Column("kind", String(16), primary_key=True),
    Column("model", String(1024), primary_key=True),
    Column("name", String(1024), primary_key=True),
    Column("created", String(32), nullable=False),  # the API's createdDateTime: listings are oldest first
    Column("body", Text, nullable=False),
)
# what each running training last said of itself (serving.hub.runs), apart from its record: not a change of the
# model that its eTag would show
_progress = Table(
    "hub_progress", _metadata,
    Column("model", String(1024), primary_key=True),
    Column("body", Text, nullable=False),
)


class AlreadyExists(Exception):
    """`Store.create` of a name that is taken (by this writer or another)."""


class StateDbError(ValueError):
    """`--state-db` names no database the hub can use; the message names the flag, never a password."""


def now() -> str:
    """The API's date-time format (UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def file_name(name: str) -> str:
    """The file (or folder) name of a record's name: the name itself, or for a long one its start and a hash."""
    if len(name) <= _LONG:
        return name
    return f"{name[:_LONG - 17]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def database_url(state_db: str | None, state_dir: Path) -> URL:
    """The records' database: `state_db` checked (a dialect the hub speaks; `postgresql://` through psycopg 3,
    which the hub installs), or SQLite in the state folder."""
    if not state_db:
        return make_url(f"sqlite:///{state_dir / 'hub.db'}")
    try:
        url = make_url(state_db)
    except ArgumentError:
        raise StateDbError(f"--state-db: {state_db.split('@')[-1]!r} is not a database URL "
                           "(sqlite:///PATH or postgresql://USER@HOST:PORT/DB)") from None
    if url.get_backend_name() not in DIALECTS:
        raise StateDbError(f"--state-db: {url.get_backend_name()!r} is not supported (sqlite or postgresql)")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def _engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below), not the driver
        dbapi_connection.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # a read-check-write transaction takes the write lock at once, so that what it checked stays true
        reading = connection.get_execution_options().get(_READING, False)
        connection.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def _row(kind: str, record: dict[str, Any], model: str | None) -> dict[str, Any]:
    return {"kind": kind, "model": model or _NONE, "name": record["name"],
            "created": record.get("createdDateTime", ""), "body": json.dumps(record)}


def _stamped(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "updatedDateTime": now(), "eTag": f'"{secrets.token_hex(8)}"'}


class Store:
    """Records by kind, name and (for evaluations) model, in the database `state_db` names (default: SQLite in
    `root`); training folders under `root`."""

    def __init__(self, root: str | Path, state_db: str | None = None):
        self.root = Path(root).expanduser().resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.url = database_url(state_db, self.root)
        try:
            self.engine = _engine(self.url)  # a missing driver is refused here
            _metadata.create_all(self.engine)  # an unreachable or refusing database here
        except SQLAlchemyError as exc:
            cause = getattr(exc, "orig", None) or exc  # the driver's error, where there is one
            raise StateDbError(f"--state-db: cannot use {self.shown_url}: {type(cause).__name__}") from None
        self._import_json_files()

    @property
    def shown_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(**{_READING: True}) as connection:
            yield connection

    @staticmethod
    def _where(kind: str, name: str | None = None, model: str | None = None) -> list[Any]:
        clauses = [_records.c.kind == kind, _records.c.model == (model or _NONE)]
        return clauses if name is None else [*clauses, _records.c.name == name]

    def _locked(self, connection: Connection, kind: str, name: str, model: str | None) -> dict[str, Any] | None:
        """The record as this transaction sees it, its row locked until the transaction ends."""
        body = connection.execute(select(_records.c.body).where(*self._where(kind, name, model))
                                  .with_for_update()).scalar()
        return None if body is None else json.loads(body)

    def _checked(self, connection: Connection, kind: str, name: str, model: str | None,
                 check: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:
        """The record, locked, after `check(record)` (which may raise); None when there is none."""
        record = self._locked(connection, kind, name, model)
        if record is not None and check is not None:
            check(record)
        return record

    def get(self, kind: str, name: str, model: str | None = None) -> dict[str, Any] | None:
        with self._reading() as connection:
            body = connection.execute(select(_records.c.body).where(*self._where(kind, name, model))).scalar()
        return None if body is None else json.loads(body)

    def create(self, kind: str, record: dict[str, Any], model: str | None = None,
               check: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Write a new record (its "name" names it) with a fresh eTag; `check(count of its kind)` runs in the
        same transaction and may raise (a quota). AlreadyExists: the name is taken."""
        record = _stamped(record)
        try:
            with self._transaction() as connection:
                self._serialize_creates(connection, kind)
                if self._locked(connection, kind, record["name"], model) is not None:
                    raise AlreadyExists(record["name"])
                if check is not None:
                    check(self._count(connection, kind, model))
                connection.execute(_records.insert().values(**_row(kind, record, model)))
        except IntegrityError:  # another writer's insert of the same name committed first
            raise AlreadyExists(record["name"]) from None
        return record

    def _serialize_creates(self, connection: Connection, kind: str) -> None:
        """Creates of one kind one at a time, so that a count quota holds across writers: PostgreSQL's row locks
        cannot lock a row that does not exist yet, its transaction-scoped advisory lock can (SQLite's BEGIN
        IMMEDIATE already serializes every writer)."""
        if self.url.get_backend_name() == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(zlib.crc32(f"visionserve-hub-{kind}".encode()))))

    def put(self, kind: str, record: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        """Write `record` whether or not it exists, with a fresh eTag and updatedDateTime."""
        record = _stamped(record)
        with self._transaction() as connection:
            connection.execute(_records.delete().where(*self._where(kind, record["name"], model)))
            connection.execute(_records.insert().values(**_row(kind, record, model)))
        return record

    def update(self, kind: str, name: str, model: str | None = None,
               check: Callable[[dict[str, Any]], None] | None = None, **changes: Any) -> dict[str, Any] | None:
        """The record with `changes` merged in (None: there is none); `check(record as it is)` runs first, in
        the same transaction, and may raise (an If-Match that no longer matches)."""
        with self._transaction() as connection:
            record = self._checked(connection, kind, name, model, check)
            if record is None:
                return None
            record = _stamped({**record, **changes})
            connection.execute(_records.update().where(*self._where(kind, name, model))
                               .values(body=json.dumps(record)))
        return record

    def delete(self, kind: str, name: str, model: str | None = None,
               check: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Remove a record (False: there was none); `check(record)` first, in the same transaction."""
        with self._transaction() as connection:
            if self._checked(connection, kind, name, model, check) is None:
                return False
            connection.execute(_records.delete().where(*self._where(kind, name, model)))
        return True

    def delete_all(self, kind: str, model: str | None = None) -> int:
        """Remove every record of a kind (of one model, for evaluations); how many there were."""
        with self._transaction() as connection:
            return connection.execute(_records.delete().where(*self._where(kind, model=model))).rowcount

    def all(self, kind: str, model: str | None = None) -> list[dict[str, Any]]:
        """Every record of a kind, oldest first (creation time, then name)."""
        with self._reading() as connection:
            bodies = connection.execute(select(_records.c.body).where(*self._where(kind, model=model))
                                        .order_by(_records.c.created, _records.c.name)).scalars()
            return [json.loads(body) for body in bodies]

    def count(self, kind: str, model: str | None = None) -> int:
        with self._reading() as connection:
            return self._count(connection, kind, model)

    def _count(self, connection: Connection, kind: str, model: str | None) -> int:
        return connection.execute(select(func.count()).select_from(_records)
                                  .where(*self._where(kind, model=model))).scalar_one()

    def job_dir(self, model: str) -> Path:
        return self.root / "jobs" / file_name(model)

    def progress(self, model: str) -> dict[str, Any]:
        """What the model's training last said of itself ({} when nothing)."""
        with self._reading() as connection:
            body = connection.execute(select(_progress.c.body).where(_progress.c.model == model)).scalar()
        return {} if body is None else json.loads(body)

    def set_progress(self, model: str, said: dict[str, Any] | None) -> None:
        """The training's latest report kept (None: forgotten, as when it starts again or its model goes)."""
        with self._transaction() as connection:
            connection.execute(_progress.delete().where(_progress.c.model == model))
            if said is not None:
                connection.execute(_progress.insert().values(model=model, body=json.dumps(said)))

    def _import_json_files(self) -> None:
        """A state folder written before the database (one JSON file per record) is imported once, in one
        transaction; its files are then moved aside (kept, not deleted) so a second start imports nothing."""
        found = [(kind, path) for kind in ("datasets", "models") for path in sorted((self.root / kind).glob("*.json"))]
        found += [("evaluations", path) for path in sorted((self.root / "evaluations").glob("*/*.json"))]
        if not found:
            return
        with self._transaction() as connection:
            for kind, path in found:
                record = json.loads(path.read_text())
                model = record.get("modelName") if kind == "evaluations" else None
                if self._locked(connection, kind, record["name"], model) is None:
                    connection.execute(_records.insert().values(**_row(kind, record, model)))
        aside = self.root / "json-before-db"
        for kind in KINDS:
            if (self.root / kind).is_dir():
                aside.mkdir(exist_ok=True)
                shutil.move(self.root / kind, aside / kind)
