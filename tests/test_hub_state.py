"""The hub's records in a database (serving.hub.state.Store): SQLite in --state-dir and a real PostgreSQL, each
rule that several ingress replicas rely on checked with several writers at once, each writer a Store of its own
(as each replica has), and a state folder of JSON files imported on first start."""

from __future__ import annotations

import json
import threading

import pytest

from serving.cli import main as cli
from serving.hub.state import AlreadyExists, StateDbError, Store
from postgres import Postgres


@pytest.fixture(scope="module")
def postgres_url():
    with Postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """Stores on one database: `open_store()` is one more writer (a replica of its own)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened: list[Store] = []

    def open_() -> Store:
        opened.append(Store(tmp_path / "state", url))
        return opened[-1]

    yield open_
    first = opened[0]
    for kind in ("datasets", "models"):  # the PostgreSQL database outlives the test: leave it empty
        first.delete_all(kind)
    for store in opened:
        store.engine.dispose()


def _together(count: int, work) -> list:
    """`work(i)` in `count` threads released at once; each one's result or the exception it raised."""
    gate, results = threading.Barrier(count), [None] * count

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001  (the outcome is the result)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_records_round_trip_oldest_first_with_a_new_etag_on_every_write(open_store):
    store = open_store()
    store.create("datasets", {"name": "b", "createdDateTime": "2026-01-02T00:00:00Z", "annotationKind": "x"})
    first = store.create("datasets", {"name": "a", "createdDateTime": "2026-01-02T00:00:00Z", "nested": {"k": [1]}})
    store.create("datasets", {"name": "z", "createdDateTime": "2026-01-01T00:00:00Z"})
    assert [r["name"] for r in store.all("datasets")] == ["z", "a", "b"]
    assert store.get("datasets", "a")["nested"] == {"k": [1]} and store.count("datasets") == 3
    changed = store.update("datasets", "a", customProperties={"p": "q"})
    assert changed["eTag"] != first["eTag"] and store.get("datasets", "a")["customProperties"] == {"p": "q"}
    assert store.update("datasets", "missing", x=1) is None
    assert store.delete("datasets", "a") and not store.delete("datasets", "a")
    assert store.get("datasets", "a") is None and store.count("datasets") == 2


def test_an_evaluation_belongs_to_its_model_and_goes_with_it(open_store):
    store = open_store()
    for model in ("m1", "m2"):
        store.create("evaluations", {"name": "e", "modelName": model}, model)
    assert store.get("evaluations", "e", "m1")["modelName"] == "m1" and store.count("evaluations", "m2") == 1
    assert store.delete_all("evaluations", "m1") == 1
    assert store.get("evaluations", "e", "m1") is None and store.get("evaluations", "e", "m2") is not None
    store.delete_all("evaluations", "m2")


def test_a_trainings_report_is_read_by_another_replica_and_leaves_the_models_etag_as_it_was(open_store):
    owner, ingress = open_store(), open_store()
    record = owner.create("models", {"name": "m", "status": "notStarted"})
    assert ingress.progress("m") == {}
    owner.set_progress("m", {"status": "training", "message": "sweep: trial 1 of 3"})
    owner.set_progress("m", {"status": "training", "message": "sweep: trial 2 of 3"})  # the latest replaces it
    assert ingress.progress("m") == {"status": "training", "message": "sweep: trial 2 of 3"}
    assert ingress.get("models", "m")["eTag"] == record["eTag"]
    owner.set_progress("m", None)
    assert ingress.progress("m") == {}


def test_of_eight_replicas_creating_one_name_at_once_exactly_one_wins(open_store):
    stores = [open_store() for _ in range(8)]
    outcomes = _together(8, lambda i: stores[i].create("models", {"name": "raced", "writer": i}))
    winners = [o for o in outcomes if isinstance(o, dict)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, AlreadyExists) for o in outcomes if not isinstance(o, dict)), outcomes
    assert stores[0].get("models", "raced")["writer"] == winners[0]["writer"] and stores[0].count("models") == 1


def test_a_count_quota_checked_in_the_creating_transaction_holds_under_concurrent_creates(open_store):
    stores = [open_store() for _ in range(6)]

    def at_most_three(count: int) -> None:
        if count >= 3:
            raise OverflowError(count)

    outcomes = _together(6, lambda i: stores[i].create("datasets", {"name": f"d{i}"}, check=at_most_three))
    assert sum(isinstance(o, dict) for o in outcomes) == 3, outcomes
    assert all(isinstance(o, OverflowError) for o in outcomes if not isinstance(o, dict)), outcomes
    assert stores[0].count("datasets") == sum(isinstance(o, dict) for o in outcomes)


def test_two_writers_with_the_same_if_match_etag_one_succeeds_the_other_sees_the_change(open_store):
    stores = [open_store(), open_store()]
    etag = stores[0].create("datasets", {"name": "d"})["eTag"]

    def if_match(record: dict) -> None:
        if record["eTag"] != etag:
            raise PermissionError("412")

    outcomes = _together(2, lambda i: stores[i].update("datasets", "d", check=if_match, writer=i))
    assert sorted(type(o).__name__ for o in outcomes) == ["PermissionError", "dict"], outcomes
    winner = next(o for o in outcomes if isinstance(o, dict))
    assert stores[1].get("datasets", "d")["writer"] == winner["writer"]


def test_a_state_folder_of_json_files_is_imported_once_and_its_files_kept_aside(tmp_path):
    state = tmp_path / "state"
    for relative, record in {"datasets/d.json": {"name": "d", "createdDateTime": "2026-01-01T00:00:00Z"},
                             "models/m.json": {"name": "m", "status": "succeeded"},
                             "evaluations/m/e.json": {"name": "e", "modelName": "m"}}.items():
        (state / relative).parent.mkdir(parents=True, exist_ok=True)
        (state / relative).write_text(json.dumps(record))
    store = Store(state)
    assert store.get("datasets", "d")["createdDateTime"] == "2026-01-01T00:00:00Z"
    assert store.get("models", "m")["status"] == "succeeded" and store.get("evaluations", "e", "m") is not None
    assert (state / "json-before-db" / "models" / "m.json").is_file() and not (state / "models").exists()
    store.delete("models", "m")
    assert Store(state).get("models", "m") is None  # a second start imports nothing again


@pytest.mark.parametrize("url, named", [
    ("not a url", "not a database URL"),
    ("mysql://u@h/db", "'mysql' is not supported"),
    ("postgresql://hub:s3cret@127.0.0.1:1/x", "cannot use postgresql+psycopg://hub:***@127.0.0.1:1/x"),
])
def test_a_state_db_the_hub_cannot_use_is_refused_naming_the_flag_and_no_password(tmp_path, url, named):
    with pytest.raises(StateDbError) as refused:
        Store(tmp_path, url)
    assert str(refused.value).startswith("--state-db: ") and named in str(refused.value)
    assert "s3cret" not in str(refused.value)


def test_the_hub_command_refuses_an_unreachable_state_db_before_ray_starts(tmp_path, capsys):
    code = cli(["hub", "--state-dir", str(tmp_path), "--state-db", "postgresql://hub:s3cret@127.0.0.1:1/x"])
    err = capsys.readouterr().err
    assert code == 2 and "--state-db: cannot use" in err and "s3cret" not in err and "Traceback" not in err
