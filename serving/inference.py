"""Scoring: an exported model folder → responses in the spec's schema (scoring.md).

`Predictor` is what the pyfunc, the online endpoint and batch scoring all call. Images are
decoded once, preprocessed by the task's single evaluation transform and batched through the
model (`batch_size` images per forward pass). A bad image becomes an error object in its own
row; the other rows are still answered (see `row_error`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.architectures import build_model, get_architecture
from models.export import SETTINGS_FILE, WEIGHTS_FILE, ModelSettings, read_settings
from models.images import PREDICTION_LIMITS, ImageError, Limits, decode

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def default_device() -> torch.device:
    """`VISIONSERVE_DEVICE` if set, else the first GPU when one is visible, else the CPU."""
    name = os.environ.get("VISIONSERVE_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def decode_base64(text: Any) -> bytes:
    """Standard or URL-safe base64, with or without the newlines `base64.encodebytes` inserts."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise ImageError("invalid_input", f"expected a base64 string, got {type(text).__name__}")
    cleaned = _WHITESPACE.sub("", _DATA_URL.sub("", text.strip()))
    if not cleaned:
        raise ImageError("invalid_base64", "empty image string")
    cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid_base64", "not valid base64") from None


def row_error(row: int, exc: ImageError) -> dict:
    """The response entry of an image that could not be scored (its neighbours still are)."""
    return {"error": {"row": row, "code": exc.code, "message": f"image {row}: {exc}"}}


def find_artifacts(model_dir: str | Path) -> tuple[Path, Path]:
    """settings.json and model.pt of an MLflow model folder (or of a bare artifacts folder)."""
    root = Path(model_dir)
    for folder in (root / "artifacts", root):
        if (folder / SETTINGS_FILE).exists():
            return folder / SETTINGS_FILE, folder / WEIGHTS_FILE
    raise FileNotFoundError(f"{model_dir}: no artifacts/{SETTINGS_FILE}; is this a visionserve model folder?")


@dataclass
class Predictor:
    spec: ModelSettings
    model: torch.nn.Module
    device: torch.device
    limits: Limits = PREDICTION_LIMITS

    @classmethod
    def from_files(cls, settings_path: str | Path, weights_path: str | Path, *, device: torch.device | None = None,
                   overrides: dict[str, Any] | None = None) -> "Predictor":
        spec = read_settings(settings_path, overrides)
        device = device or default_device()
        arch = get_architecture(spec.model_name, spec.task.family)
        model = build_model(arch, len(spec.labels), spec.settings)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        except RuntimeError as exc:
            raise ValueError(f"{weights_path} does not fit {spec.model_name} with {len(spec.labels)} labels "
                             f"and the settings in {settings_path} ({str(exc).splitlines()[0]}); "
                             "was valid_crop_size changed for a ViT model?") from None
        model.eval().to(device)
        log.info("loaded %s (%s, %d labels) on %s", spec.model_name, spec.task.name, len(spec.labels), device)
        return cls(spec, model, device)

    @classmethod
    def load(cls, model_dir: str | Path, **kwargs: Any) -> "Predictor":
        return cls.from_files(*find_artifacts(model_dir), **kwargs)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    def predict_images(self, images: Sequence[Image.Image]) -> list[dict]:
        """Responses for decoded RGB images, `batch_size` images per forward pass."""
        ops, settings = self.spec.task.ops, self.spec.settings
        preprocess = ops.preprocess(settings)
        responses: list[dict] = []
        for start in range(0, len(images), settings.batch_size):
            chunk = images[start:start + settings.batch_size]
            inputs = [preprocess(image) for image in chunk]
            with torch.inference_mode():
                outputs = ops.predict(self.model, inputs, settings)
            responses += [ops.format(out, image.size, self.labels, settings) for out, image in zip(outputs, chunk)]
        return responses

    def decode_rows(self, rows: Sequence[Any], *, base64_encoded: bool = True) -> list[Image.Image | ImageError]:
        """Decode every row (base64 strings, or file paths), keeping each failure in its place."""
        decoded: list[Image.Image | ImageError] = []
        for row in rows:
            try:
                decoded.append(decode(decode_base64(row) if base64_encoded else row, self.limits))
            except ImageError as exc:
                decoded.append(exc)
        return decoded

    def predict_rows(self, decoded: Sequence[Image.Image | ImageError]) -> list[dict]:
        """Responses in input order; a row that failed to decode gets its error object."""
        good = [d for d in decoded if isinstance(d, Image.Image)]
        answers = iter(self.predict_images(good))
        return [next(answers) if isinstance(d, Image.Image) else row_error(i, d) for i, d in enumerate(decoded)]

    def predict_encoded(self, rows: Sequence[Any]) -> list[dict]:
        """Responses for base64 strings, in input order; a bad row gets an error object."""
        return self.predict_rows(self.decode_rows(rows))
