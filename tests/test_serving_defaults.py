"""Serving defaults that keep a careless start safe: no open endpoint beyond this machine without a key
or `--insecure`, no empty key, request ids that are plain and bounded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import SettingsError
from serving.access import key_digest, key_matches, read_key_file
from serving.edge import request_id_of

VISIONSERVE = str(Path(sys.executable).parent / "visionserve")


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([VISIONSERVE, "serve", "/nonexistent/model", *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["serve", "hub"])
def test_serving_beyond_loopback_without_a_key_is_refused_naming_the_host_and_the_way_out(command, tmp_path):
    done = _serve("--host", "0.0.0.0") if command == "serve" else subprocess.run(
        [VISIONSERVE, "hub", "--state-dir", str(tmp_path / "state"), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--host 0.0.0.0" in done.stderr and "--insecure" in done.stderr and "--api-key-file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["localhost", "::1"])
def test_a_loopback_host_without_a_key_gets_past_the_key_check(host):
    done = _serve("--host", host)  # fails later, on the missing model, not on the key
    assert done.returncode != 0 and "--insecure" not in done.stderr and "/nonexistent/model" in done.stderr


def test_insecure_lets_a_non_loopback_host_past_the_key_check():
    done = _serve("--host", "0.0.0.0", "--insecure")
    assert done.returncode != 0 and "--insecure" not in done.stderr and "/nonexistent/model" in done.stderr


def test_an_empty_key_file_is_refused_on_the_command_line(tmp_path):
    key = tmp_path / "key"
    key.write_text("  \n")
    done = _serve("--api-key-file", str(key))
    assert done.returncode != 0 and str(key) in done.stderr and "empty" in done.stderr


def test_an_empty_or_missing_key_file_is_refused_by_the_application_builder(tmp_path):
    from serving.app import build_app

    empty = tmp_path / "empty"
    empty.write_text("")
    for path, words in ((empty, "empty"), (tmp_path / "missing", "No such file")):
        with pytest.raises(SettingsError) as info:
            build_app({"model": str(tmp_path), "api_key_file": str(path)})
        assert str(path) in str(info.value) and words in str(info.value) and "api_key_file" in str(info.value)


def test_an_unknown_backend_in_a_serve_config_is_refused_by_the_application_builder(tmp_path):
    from serving.app import build_app

    with pytest.raises(SettingsError, match=r"backend: 'onx' is not one of auto, torch, onnx"):
        build_app({"model": str(tmp_path), "backend": "onx"})


def test_the_key_is_kept_as_its_digest_and_compared_by_it(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    digest = read_key_file(key)
    assert digest == key_digest("s3cret") and "s3cret" not in digest
    assert key_matches("s3cret", digest) and not key_matches("s3cre", digest)
    assert not key_matches("", key_digest("")) and not key_matches(None, digest)


@pytest.mark.parametrize("given", ["abc-123", "req.42:x_y", "a" * 128])
def test_a_plain_short_request_id_is_kept(given):
    assert request_id_of(given) == given


@pytest.mark.parametrize("given", [None, "", "a" * 129, "a b", "<script>", "x\r\nSet-Cookie: y", "é"])
def test_any_other_request_id_is_replaced_by_a_new_one(given):
    made = request_id_of(given)
    assert made != given and len(made) == 32 and made.isalnum()
    assert request_id_of(given) != made  # a new one each time, never a shared constant
