"""Scoring: a loaded model → responses in the spec's schema (scoring.md).

`Predictor` is what the pyfunc, the online endpoint and batch scoring all call. Images are
decoded once, preprocessed by the task's single evaluation transform and batched through the
model (`batch_size` images per forward pass). A bad image becomes an error object in its own
row; the other rows are still answered (`serving.contract.row_error`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.data.formats import PREDICTION_LIMITS, ImageLimits
from models.data.images import decode_tensor, probe, shrink, to_tensor
from models.errors import ErrorCode, ImageError, SettingsError
from models.export import ModelSettings
from models.tasks.architectures import Architecture
from models.tasks.fields import as_dict
from models.tasks.registry import inference_settings
from serving.contract import parameter_forms, parse_entry, per_request_problems, row_error
from serving.explaining import Explanations
from serving.loading import LoadedModel, find_artifacts, load_model
from serving.onnx_backend import OnnxScorer, scorer_for

log = logging.getLogger(__name__)
_FAILED = ImageError(ErrorCode.INFERENCE_FAILED, "the model failed on this image (the server log has the details)")


@dataclass
class Predictor:
    spec: ModelSettings
    arch: Architecture
    model: torch.nn.Module
    device: torch.device
    limits: ImageLimits = PREDICTION_LIMITS
    scorer: torch.nn.Module | None = None  # what scores (default `model`); explanations use `model`
    explainers: int = 1  # explanations that may run at once (each on its own copy of the model)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _explanations: Explanations = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scorer = self.scorer or self.model
        loaded = LoadedModel(self.spec, self.arch, self.model, self.scorer, self.device)
        self._explanations = Explanations(loaded, self.limits, self.explainers)  # explainers made on first use

    @classmethod
    def from_files(cls, settings_path: str | Path, weights_path: str | Path, *, limits: ImageLimits = PREDICTION_LIMITS,
                   explainers: int = 1, **kwargs: Any) -> Predictor:
        """The model of an exported folder's files, ready to score (see `serving.loading.load_model`);
        `limits`: what one image may be (the synchronous 6 MB by default, batch scoring's 20 MB)."""
        loaded = load_model(settings_path, weights_path, **kwargs)
        return cls(loaded.spec, loaded.arch, loaded.model, loaded.device, limits, loaded.scorer, explainers)

    @classmethod
    def load(cls, model_dir: str | Path, **kwargs: Any) -> Predictor:
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
    def backend(self) -> str:
        """What scores: "onnx" (ONNX Runtime), "compiled" (torch.compile) or "torch" (eager)."""
        return "onnx" if isinstance(self.scorer, OnnxScorer) else "compiled" if self.compiled else "torch"

    def description(self, explains: bool) -> dict[str, Any]:
        """What `/metadata` says of the model (on `visionserve serve` and the hub): task, labels, the settings in
        force, the per-request `parameters` (and `xai_parameters` when `explains`), what scores."""
        spec = self.spec
        return {"task": spec.task.name, "model_name": spec.model_name, "labels": spec.labels,
                "settings": as_dict(spec.settings, inference_only=True),
                **parameter_forms(spec.task.inference_cls, spec.settings, explains),
                "compiled": self.compiled, "backend": self.backend}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def settings_for(self, params: Mapping[str, Any] | None) -> Any:
        """The settings in force for one request: settings.json plus validated per-request overrides."""
        given = {k: v for k, v in (params or {}).items() if v is not None}
        if not given:
            return self.spec.settings
        problems = per_request_problems(self.spec.task.inference_cls, given)
        if self.arch.fixed_input and given.get("valid_crop_size", self.spec.settings.valid_crop_size) != \
                self.spec.settings.valid_crop_size:
            problems.append(f"valid_crop_size: {self.arch.name} was built for {self.spec.settings.valid_crop_size}")
        if problems:
            raise SettingsError(problems, "request parameters")
        current = as_dict(self.spec.settings, inference_only=True)
        return inference_settings(self.spec.task, {**current, **given}, source="request parameters")

    def _score(self, count: int, sizes: Sequence[tuple[int, int]], load, params) -> list[dict | ImageError]:
        """Score `count` images (`sizes`: width, height), `batch_size` per forward pass (fewer for large
        inputs), loading each only when its batch comes (`load(i, size)` → uint8 [3, H, W], decoded no larger
        than `size`, the size the model needs), so memory holds one batch of model-sized pixels at a time.
        Images of similar shape are batched together (less padding for detectors); answers keep input
        order. One image's failure is its own: a batch that fails is scored again image by image."""
        settings = self.settings_for(params)
        ops = self.spec.task.ops
        preprocess = ops.preprocess(settings)
        order = sorted(range(count), key=lambda i: sizes[i][1] / sizes[i][0])
        results: list[dict | ImageError | None] = [None] * count
        with self._lock, torch.inference_mode():
            scorer = scorer_for(self.scorer, settings)
            ops.configure(scorer, settings)
            step = settings.images_per_pass()
            for start in range(0, count, step):
                loaded = []
                for i in order[start:start + step]:
                    try:
                        size = ops.decode_size(settings, *sizes[i])
                        pixels = shrink(load(i, size).to(self.device, non_blocking=True), size)
                        loaded.append((i, preprocess(pixels).to(self.dtype)))
                    except ImageError as exc:
                        results[i] = exc
                    except Exception:  # noqa: BLE001  (this image only; logged with its traceback)
                        log.exception("image %d: preprocessing failed", i)
                        results[i] = _FAILED
                if loaded:
                    self._forward(scorer, loaded, settings, results)
        return results

    def _forward(self, scorer: torch.nn.Module, loaded: list[tuple[int, torch.Tensor]], settings,
                 results: list) -> None:
        """Answers of one batch into `results` (boxes are fractions of the tensor the model saw); when the
        batch fails, each image alone."""
        ops = self.spec.task.ops
        try:
            outputs = ops.predict(scorer, [x for _, x in loaded], settings)
            answers = [ops.format(out, (x.shape[-1], x.shape[-2]), self.labels, settings)
                       for (_, x), out in zip(loaded, outputs)]
        except Exception:  # noqa: BLE001
            if len(loaded) > 1:
                for one in loaded:
                    self._forward(scorer, [one], settings, results)
                return
            log.exception("image %d: the model failed", loaded[0][0])
            answers = [_FAILED]
        for (i, _), answer in zip(loaded, answers):
            results[i] = answer

    def predict_images(self, images: Sequence[Image.Image | torch.Tensor],
                       params: Mapping[str, Any] | None = None) -> list[dict]:
        """Responses for decoded images (RGB PIL or uint8 [3, H, W] tensors), in input order."""
        tensors = [to_tensor(im) if isinstance(im, Image.Image) else im for im in images]
        sizes = [(t.shape[-1], t.shape[-2]) for t in tensors]
        return self._score(len(tensors), sizes, lambda i, _: tensors[i], params)

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
        scored = self._score(len(usable), sizes,
                             lambda k, size: decode_tensor(items[usable[k]], self.limits, self.device, size), params)
        for k, result in enumerate(scored):
            if isinstance(result, ImageError):
                errors[usable[k]] = result
        answers = dict(zip(usable, scored))
        return [row_error(rows[i], errors[i]) if i in errors else answers[i] for i in range(len(items))]

    def explain_bytes(self, items: Sequence[bytes | ImageError], xai: Sequence[Any],
                      params: Mapping[str, Any] | None = None, stop: threading.Event | None = None, *,
                      rows: Sequence[int] | None = None) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: explain.XaiParameters) per image, in input order; once
        `stop` is set, the images not yet explained are answered as stopped."""
        settings = self.settings_for(params)
        return self._explanations.explain(items, xai, settings, rows if rows is not None else range(len(items)), stop)

    def predict_files(self, paths: Sequence[str | Path], params: Mapping[str, Any] | None = None) -> list[dict]:
        return self.predict_bytes([_read_or_error(p) for p in paths], params)

    def predict_encoded(self, rows: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[dict]:
        """Responses for base64 strings, or JSON strings `{"image_base64", "model_explainability",
        "xai_parameters"}` (scoring.md), mixed freely, in input order; a bad row gets an error object."""
        from explain.params import parse_xai

        entries = [parse_entry(row, f"row {i}") for i, row in enumerate(rows)]
        wanted: dict[int, Any] = {}
        for i, entry in enumerate(entries):
            if entry.explain and not isinstance(entry.data, ImageError):
                try:
                    wanted[i] = parse_xai(entry.xai_parameters)
                except SettingsError as exc:
                    entry.data = ImageError(ErrorCode.INVALID_XAI_PARAMETERS, "; ".join(exc.problems))
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
        return ImageError(ErrorCode.MISSING, f"file not found: {path}")
    except OSError as exc:
        return ImageError(ErrorCode.UNREADABLE, f"cannot read {path}: {exc}")
