"""models.runtime's pieces for clusters, without one: CPUs per piece of work sized to a node, what travels to
other nodes, --env flags, and the per-process downloads folder (tests/test_cluster_*.py use them on a cluster)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.runtime import (DOWNLOADS, cpus_each, parse_env_flags, remove_orphaned_downloads, travelling_env)
from serving.cli import main
from serving.cluster import replica_env


@pytest.mark.parametrize("count, nodes, available, cpus", [
    (1, [8, 8], None, 8),  # not 16: no node has 16 CPUs, such a trial would never be scheduled
    (2, [8, 8], None, 8),
    (3, [8, 8], None, 4),  # 8 + 8 CPUs hold two pieces of 8, or four of 4
    (1, [2, 2], 4, 2),
    (2, [2, 2], 4, 2),
    (3, [2, 2], 4, 1),
    (2, [8, 8], 6, 3),  # what is free caps it (a Serve deployment keeps its CPUs)
    (1, [8, 2], None, 8),
    (4, [1], None, 1),  # more pieces than CPUs: 1 each, some wait
])
def test_each_piece_of_work_gets_cpus_that_fit_on_one_node(count, nodes, available, cpus):
    assert cpus_each(count, nodes, available) == cpus


def test_env_flags_are_name_value_pairs_and_a_bad_one_is_named():
    assert parse_env_flags(["A=1", "B_2=x=y", "EMPTY="]) == {"A": "1", "B_2": "x=y", "EMPTY": ""}
    for bad in ("NOVALUE", "1A=x", "=x", "A-B=x"):
        with pytest.raises(ValueError, match=f"--env '{bad}': expected NAME=VALUE"):
            parse_env_flags([bad])


@pytest.mark.parametrize("command", ["serve", "hub"])
def test_a_malformed_env_flag_is_refused_before_anything_starts(command, capsys):
    args = [command, "--env", "1BAD=x"] + (["no-such-model"] if command == "serve" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--env '1BAD=x': expected NAME=VALUE" in err and "Traceback" not in err


def test_mlflows_uris_and_visionserve_settings_travel_made_absolute(monkeypatch, tmp_path, caplog):
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "VISIONSERVE_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")
    monkeypatch.setenv("VISIONSERVE_DEVICE", "cpu")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never")  # secrets stay on the nodes
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        env = travelling_env()
    assert env == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs.db'}", "VISIONSERVE_DEVICE": "cpu"}
    assert "processes on other nodes of the cluster cannot reach it" in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        assert travelling_env()["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert caplog.text == ""


def test_replicas_get_what_travels_then_their_own_then_the_env_flags(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://a:5000")
    own = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert replica_env(own, {"MLFLOW_TRACKING_URI": "http://b:5000"}, cluster=True) == {
        **{k: v for k, v in travelling_env().items() if k != "MLFLOW_TRACKING_URI"},
        "MLFLOW_TRACKING_URI": "http://b:5000", "OMP_WAIT_POLICY": "PASSIVE"}
    assert replica_env(own, {}, cluster=False) == own  # a local instance's replicas inherit this environment


def test_a_processs_downloads_folder_goes_when_it_exits_and_a_killed_ones_with_the_next(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = ("import os, sys; from models.runtime import downloads_folder; f = downloads_folder(); "
            "(f / 'model').mkdir(); print(f, flush=True); sys.stdout.flush(); {}")
    done = subprocess.run([sys.executable, "-c", code.format("")], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    assert not Path(done.stdout.strip()).exists()  # removed at exit
    killed = subprocess.run([sys.executable, "-c", code.format("os._exit(0)")], env=env, capture_output=True,
                            text=True, timeout=120, check=True)  # no clean-up at exit, as for a killed replica
    left = Path(killed.stdout.strip())
    assert left.parent == tmp_path / DOWNLOADS and (left / "model").is_dir()
    alive = tmp_path / DOWNLOADS / f"{os.getpid()}-{_start_time(os.getpid())}"
    alive.mkdir()
    os.environ["TMPDIR"], before = str(tmp_path), os.environ.get("TMPDIR")
    try:
        import tempfile

        tempfile.tempdir = None  # tempfile caches the folder it found
        assert remove_orphaned_downloads() == [left.name]
    finally:
        os.environ.pop("TMPDIR") if before is None else os.environ.update(TMPDIR=before)
        tempfile.tempdir = None
    assert not left.exists() and alive.is_dir()  # a running process's folder stays


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
