"""LitServe for bench/serve_throughput.py: an environment of its own (litserve from PyPI, made once and kept in
the temp folder; visionserve and its dependencies seen through a .pth file), serving the same model folder with
visionserve's own Predictor, so model and preprocessing are the same and only the server differs."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = Path(tempfile.gettempdir()) / "visionserve-bench-litserve"

SERVER = '''"""LitServe serving a visionserve model folder: the cloud's input_data body, one image per request."""
import base64
import os
import sys

import litserve as ls
import torch


class VisionAPI(ls.LitAPI):
    def setup(self, device):
        from serving.predictor import Predictor
        from serving.scoring import Scoring

        torch.set_num_threads(int(os.environ["LITSERVE_THREADS"]))
        self.scoring = Scoring(Predictor.load(os.environ["LITSERVE_MODEL"]))

    def decode_request(self, request):
        return base64.b64decode(request["input_data"]["data"][0])

    def predict(self, images):
        return self.scoring.score_bytes(list(images))

    def encode_response(self, output):
        return [output]


if __name__ == "__main__":
    api = VisionAPI(max_batch_size=int(os.environ["LITSERVE_BATCH"]), batch_timeout=0.01)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=int(os.environ["LITSERVE_WORKERS"]))
    server.run(port=int(sys.argv[1]))
'''


def python() -> Path:
    """The environment's interpreter, made on first use (`uv venv` + `uv pip install litserve`)."""
    interpreter = ENV / "bin" / "python"
    marker = ENV / ".ready"
    if not marker.exists():
        shutil.rmtree(ENV, ignore_errors=True)
        uv = shutil.which("uv") or "uv"
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(ENV)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(interpreter), "litserve"], check=True)
        own = subprocess.run([str(interpreter), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        # after litserve's own packages: the project and this environment's packages (torch, ...)
        Path(own, "visionserve-bench.pth").write_text("\n".join([str(ROOT), *site.getsitepackages()]) + "\n")
        marker.touch()
    return interpreter


def command(port: int) -> list[str]:
    script = ENV / "server.py"
    interpreter = python()
    script.write_text(SERVER)
    return [str(interpreter), str(script), str(port)]


def environment(model: Path, workers: int, threads: int, batch: int = 16) -> dict[str, str]:
    return {**os.environ, "LITSERVE_MODEL": str(model), "LITSERVE_WORKERS": str(workers),
            "LITSERVE_THREADS": str(threads), "LITSERVE_BATCH": str(batch)}


def version() -> str:
    done = subprocess.run([str(python()), "-c", "import litserve; print(litserve.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"
