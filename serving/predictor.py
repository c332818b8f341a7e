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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.tasks.architectures import Architecture, build_model, get_architecture
from models.export import SETTINGS_FILE, WEIGHTS_FILE, ModelSettings, read_settings
from models.data.images import PREDICTION_LIMITS, Limits, decode_tensor, probe, to_tensor
from models.errors import ImageError
from models.errors import SettingsError
from models.tasks.fields import as_dict, field_specs
from models.tasks.registry import inference_settings

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


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of `model` with each BatchNorm folded into the convolution before it (torch.fx):
    the same outputs to ~1e-6, 3-16 % less time per image for resnet18 on a CPU. `model` itself when it
    has no BatchNorm2d (the detectors' is frozen into their backbones already) or torch.fx cannot trace it."""
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception as exc:  # noqa: BLE001  (a model fx cannot trace is scored as it is)
        log.info("BatchNorm not folded for %s: %s", type(model).__name__, exc)
        return model


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
    arch: Architecture
    model: torch.nn.Module
    device: torch.device
    limits: Limits = PREDICTION_LIMITS
    scorer: torch.nn.Module | None = None  # what scores (default `model`); explanations use `model`
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _explainer: Any = field(default=None, repr=False)  # explain.Explainer, made on first use
    _explain_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.scorer = self.scorer or self.model

    @classmethod
    def from_files(cls, settings_path: str | Path, weights_path: str | Path, *, device: torch.device | None = None,
                   overrides: dict[str, Any] | None = None, compile_scorer: bool = False) -> "Predictor":
        """The model of an exported folder, ready to score; `compile_scorer`: a classifier on the CPU is
        compiled now (serving.compiled: slower to load, faster per image; for long-lived processes)."""
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
        scorer = fold_batchnorm(model)
        for module in {model, scorer}:
            if arch.channels_last:
                module.to(memory_format=torch.channels_last)
            if spec.settings.half_precision and device.type == "cuda":
                module.half()
        shape = spec.task.ops.input_shape(spec.settings)
        if compile_scorer and device.type == "cpu" and shape:
            from serving.compiled import compile_for_cpu

            scorer = compile_for_cpu(scorer, shape)
        log.info("loaded %s (%s, %d labels) on %s", spec.model_name, spec.task.name, len(spec.labels), device)
        return cls(spec, arch, model, device, scorer=scorer)

    @classmethod
    def load(cls, model_dir: str | Path, **kwargs: Any) -> "Predictor":
        return cls.from_files(*find_artifacts(model_dir), **kwargs)

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def compiled(self) -> bool:
        """Whether scoring runs compiled code (see serving.compiled)."""
        from serving.compiled import Compiled

        return isinstance(self.scorer, Compiled)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def settings_for(self, params: Mapping[str, Any] | None) -> Any:
        """The settings in force for one request: settings.json plus validated per-request overrides."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        if not given:
            return self.spec.settings
        specs = field_specs(self.spec.task.inference_cls)
        problems = [f"{k}: set when the model loads (settings.json or --set), not per request"
                    for k in given if k in specs and not specs[k].per_request]
        if self.arch.fixed_input and given.get("valid_crop_size", self.spec.settings.valid_crop_size) != \
                self.spec.settings.valid_crop_size:
            problems.append(f"valid_crop_size: {self.arch.name} was built for {self.spec.settings.valid_crop_size}")
        if problems:
            raise SettingsError(problems, "request parameters")
        current = as_dict(self.spec.settings, inference_only=True)
        return inference_settings(self.spec.task, {**current, **given}, source="request parameters")

    def _score(self, count: int, sizes: Sequence[tuple[int, int]], load, params) -> list[dict | ImageError]:
        """Score `count` images, `batch_size` per forward pass, loading each (`load(i)` → uint8
        [3, H, W]) only when its batch comes, so memory holds one batch of pixels at a time. Images
        of similar shape are batched together (less padding for detectors); answers keep input order."""
        settings = self.settings_for(params)
        ops = self.spec.task.ops
        preprocess = ops.preprocess(settings)
        order = sorted(range(count), key=lambda i: sizes[i][1] / sizes[i][0])
        results: list[dict | ImageError | None] = [None] * count
        with self._lock, torch.inference_mode():
            ops.configure(self.scorer, settings)
            for start in range(0, count, settings.batch_size):
                loaded = []
                for i in order[start:start + settings.batch_size]:
                    try:
                        loaded.append((i, preprocess(load(i).to(self.device, non_blocking=True)).to(self.dtype)))
                    except ImageError as exc:
                        results[i] = exc
                if not loaded:
                    continue
                outputs = ops.predict(self.scorer, [x for _, x in loaded], settings)
                for (i, _), out in zip(loaded, outputs):
                    results[i] = ops.format(out, sizes[i], self.labels, settings)
        return results

    def predict_images(self, images: Sequence[Image.Image | torch.Tensor],
                       params: Mapping[str, Any] | None = None) -> list[dict]:
        """Responses for decoded images (RGB PIL or uint8 [3, H, W] tensors), in input order."""
        tensors = [to_tensor(im) if isinstance(im, Image.Image) else im for im in images]
        sizes = [(t.shape[-1], t.shape[-2]) for t in tensors]
        return self._score(len(tensors), sizes, tensors.__getitem__, params)

    def predict_bytes(self, items: Sequence[bytes | ImageError], params: Mapping[str, Any] | None = None, *,
                      rows: Sequence[int] | None = None) -> list[dict]:
        """Responses for encoded images (or the error each row already has), in input order; each
        image is checked from its header first and decoded only when its batch is scored. `rows`:
        the row numbers error objects name (default 0, 1, ...)."""
        self.settings_for(params)  # a bad parameter fails the request before any image work
        rows = rows if rows is not None else range(len(items))
        sizes: list[tuple[int, int]] = []
        usable: list[int] = []
        errors: dict[int, ImageError] = {}
        for i, item in enumerate(items):
            try:
                if isinstance(item, ImageError):
                    raise item
                sizes.append(probe(item, self.limits))
                usable.append(i)
            except ImageError as exc:
                errors[i] = exc
        scored = self._score(len(usable), sizes, lambda k: decode_tensor(items[usable[k]], self.limits, self.device),
                             params)
        for k, result in enumerate(scored):
            if isinstance(result, ImageError):
                errors[usable[k]] = result
        answers = dict(zip(usable, scored))
        return [row_error(rows[i], errors[i]) if i in errors else answers[i] for i in range(len(items))]

    def explain_bytes(self, items: Sequence[bytes | ImageError], xai: Sequence[Any],
                      params: Mapping[str, Any] | None = None, *, rows: Sequence[int] | None = None) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: explain.XaiParameters) per image, in input order.
        Runs on a private copy of the model under its own lock, so scoring is not held up."""
        from explain import explain_crop, make_explainer
        from models.tasks.classification import eval_crop

        settings = self.settings_for(params)
        rows = rows if rows is not None else range(len(items))
        if not self.spec.task.is_classification:
            error = ImageError("explanations_unsupported", "explanations are for classification models only; "
                               f"this {self.spec.task.name} model can only score (set model_explainability to false)")
            return [row_error(r, error) for r in rows]
        crop = eval_crop(settings)
        out = []
        with self._explain_lock:
            if self._explainer is None:
                self._explainer = make_explainer(self.model, self.arch.name, self.spec.task.ops.multilabel,
                                                 self.device)
            for row, item, wishes in zip(rows, items, xai):
                try:
                    if isinstance(item, ImageError):
                        raise item
                    with torch.inference_mode():  # decode_tensor checks bytes and size from the header first
                        pixels = crop(decode_tensor(item, self.limits, self.device))
                    probs, extra = explain_crop(self._explainer, pixels, self.labels, wishes)
                    out.append({**self.spec.task.ops.format(probs, (0, 0), self.labels, settings), **extra})
                except ImageError as exc:
                    out.append(row_error(row, exc))
        return out

    def predict_files(self, paths: Sequence[str | Path], params: Mapping[str, Any] | None = None) -> list[dict]:
        return self.predict_bytes([_read_or_error(p) for p in paths], params)

    def predict_encoded(self, rows: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[dict]:
        """Responses for base64 strings, or JSON strings `{"image_base64", "model_explainability",
        "xai_parameters"}` (scoring.md), mixed freely, in input order; a bad row gets an error object."""
        from explain.params import parse_xai
        from serving.contract import parse_entry

        entries = [parse_entry(row, f"row {i}") for i, row in enumerate(rows)]
        wanted: dict[int, Any] = {}
        for i, entry in enumerate(entries):
            if entry.explain and not isinstance(entry.data, ImageError):
                try:
                    wanted[i] = parse_xai(entry.xai_parameters)
                except SettingsError as exc:
                    entry.data = ImageError("invalid_xai_parameters", "; ".join(exc.problems))
        plain = [i for i in range(len(entries)) if i not in wanted]
        answers: dict[int, dict] = {}
        if plain:
            answers.update(zip(plain, self.predict_bytes([entries[i].data for i in plain], params, rows=plain)))
        if wanted:
            keys = list(wanted)
            answers.update(zip(keys, self.explain_bytes([entries[i].data for i in keys], list(wanted.values()),
                                                        params, rows=keys)))
        return [answers[i] for i in range(len(entries))]


def _read_or_error(path: str | Path) -> bytes | ImageError:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return ImageError("missing", f"file not found: {path}")
    except OSError as exc:
        return ImageError("unreadable", f"cannot read {path}: {exc}")
