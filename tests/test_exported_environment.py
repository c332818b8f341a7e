"""The exported MLflow model carries what it needs: visionserve's code in `code/`, and a requirements.txt of
published packages that covers everything loading, scoring and explaining import."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest

from models.runtime import free_port, wait_until_ready

PROBE = r"""
import base64, json, sys
from importlib import metadata
import mlflow.pyfunc, pandas as pd
req = json.load(open(sys.argv[1]))
model = mlflow.pyfunc.load_model(req["model"])
import serving.pyfunc
rows = [{"image": req["image"]}]
if req["explain"]:
    rows = [{"image": json.dumps({"image_base64": req["image"], "model_explainability": True,
                                  "xai_parameters": {"xai_algorithm": "guided_backprop"}})}]
out = model.predict(pd.DataFrame(rows))
ours = sorted({m.__file__ for name, m in list(sys.modules.items())
               if name.split(".")[0] in ("models", "serving", "explain") and getattr(m, "__file__", None)})
json.dump({"code": serving.pyfunc.__file__, "answer": out, "our_modules": ours}, open(sys.argv[2], "w"))
"""


def _requirements(model_dir: Path) -> list[tuple[str, str]]:
    lines = [line.strip() for line in (model_dir / "requirements.txt").read_text().splitlines()]
    pins = [re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line) for line in lines if line and not line.startswith("#")]
    assert all(pins), lines
    return [(m.group(1), m.group(2)) for m in pins]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(names: list[str]) -> set[str]:
    """The distributions `pip install` of `names` brings: each one's requirements, in turn (extras aside)."""
    seen: set[str] = set()
    todo = [_norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(_norm(re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]))
    return seen


def _imported_distributions(files: list[str]) -> set[str]:
    """The distributions whose modules these files import anywhere (functions' lazy imports too)."""
    owners = metadata.packages_distributions()
    names: set[str] = set()
    for file in files:
        for node in ast.walk(ast.parse(Path(file).read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"models", "serving", "explain", "__future__"}
    unknown = {n for n in third_party if n not in owners}
    assert not unknown, f"imported by visionserve but installed by no distribution: {sorted(unknown)}"
    return {_norm(d) for n in third_party for d in owners[n]}


def _probe(model_dir: Path, image: Path, tmp_path: Path, explain: bool) -> dict:
    request = tmp_path / "probe.json"
    request.write_text(json.dumps({"model": str(model_dir), "explain": explain,
                                   "image": base64.b64encode(image.read_bytes()).decode()}))
    out = tmp_path / "probe-out.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(request), str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _first_image(data) -> Path:
    line = json.loads(Path(data.train_jsonl).read_text().splitlines()[0])
    return Path(data.train_jsonl).parent / line["image_url"]


def test_requirements_pin_only_published_packages_of_this_environment(trained):
    model_dir = Path(trained("image_classification")[0].model_dir)
    pins = _requirements(model_dir)
    assert "visionserve" not in {_norm(name) for name, _ in pins}  # never published: pip could not find it
    for name, version in pins:
        assert metadata.version(name) == version


def test_the_model_folder_holds_visionserve_code_without_bytecode(trained):
    model_dir = Path(trained("image_classification")[0].model_dir)
    for package in ("models", "serving", "explain"):
        assert (model_dir / "code" / package / "__init__.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))
    assert not (model_dir / "code" / "tests").exists() and not (model_dir / "code" / "loadtests").exists()


@pytest.mark.parametrize("task, explain", [("image_classification", True), ("image_instance_segmentation", False)])
def test_loading_scoring_and_explaining_import_only_what_the_requirements_bring(trained, tmp_path, task, explain):
    result, data = trained(task)
    model_dir = Path(result.model_dir)
    probe = _probe(model_dir, _first_image(data), tmp_path, explain)
    assert Path(probe["code"]).is_relative_to(model_dir / "code")  # the folder's own code, not the installed one
    answer = probe["answer"][0]
    assert "error" not in answer, answer
    if explain:
        assert answer.get("visualizations"), answer.keys()
    assert not explain or any(f.endswith("explain/methods.py") for f in probe["our_modules"])
    brought = _closure([name for name, _ in _requirements(model_dir)])
    missing = _imported_distributions(probe["our_modules"]) - brought
    assert not missing, f"imported but not in requirements.txt (nor required by what is): {sorted(missing)}"


@pytest.mark.slow
def test_mlflow_serves_the_folder_from_a_fresh_environment_built_from_its_requirements(trained, tmp_path):
    """`mlflow models serve --env-manager uv`: a new virtual environment from requirements.txt alone (packages
    from the registry, through uv's cache), visionserve's code from the folder, and the same answer."""
    import shutil

    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    result, data = trained("image_classification")
    model_dir = tmp_path / "model"
    shutil.copytree(result.model_dir, model_dir)  # a folder nowhere near the checkout
    image = base64.b64encode(_first_image(data).read_bytes()).decode()
    local = _probe(model_dir, _first_image(data), tmp_path, explain=False)["answer"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT"))}
    env["MLFLOW_ENV_ROOT"] = str(tmp_path / "envs")
    env["PATH"] = f"{Path(uv).parent}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "serve.log"
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow, "models", "serve", "-m", str(model_dir), "--env-manager", "uv",
                             "-h", "127.0.0.1", "-p", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/ping", proc, log, timeout=1200)
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=300,
                              json={"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == local
        pythons = list((tmp_path / "envs").rglob("bin/python"))
        assert pythons and all(not p.resolve().is_relative_to(Path(sys.prefix).resolve()) for p in pythons)
        installed = "import importlib.metadata as m; m.version('visionserve')"
        assert subprocess.run([str(pythons[0]), "-c", installed], capture_output=True).returncode != 0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        shutil.rmtree(tmp_path / "envs", ignore_errors=True)  # a whole torch install: GBs
