"""A loaded model scoring images: the settings in force for a request, batching, decoding, formatting
(scoring.md's responses).

The scoring core (serving.scoring) validates a request once and hands the `Predictor` typed values: the
settings object in force and images whose headers were read once (`Probed`). Images are decoded when their batch
comes, at the size the model needs, preprocessed by the task's evaluation transform and batched through the
scorer (`batch_size` per forward pass). A bad image becomes an error object in its own row; the others are still
answered (`serving.contract.row_error`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from explain.params import xai_parameters_class
from models.data.formats import PREDICTION_LIMITS, ImageLimits
from models.data.images import Probed, decode_tensor, shrink, to_tensor
from models.errors import ErrorCode, ImageError, SettingsError
from models.int8_record import TOLERANCE
from models.tasks.fields import as_dict
from models.tasks.registry import inference_settings
from serving.contract import row_error
from serving.explaining import Explanations
from serving.loading import LoadedModel, ModelFolder, load_model
from serving.parameters import parameter_forms, per_request_problems

log = logging.getLogger(__name__)
_FAILED = ImageError(ErrorCode.INFERENCE_FAILED, "the model failed on this image (the server log has the details)")


@dataclass
class Predictor:
    loaded: LoadedModel
    limits: ImageLimits = PREDICTION_LIMITS  # what one image may be (batch scoring allows 20 MB)
    explainers: int = 1  # explanations that may run at once (each on its own copy of the model)
    _explanations: Explanations = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._explanations = Explanations(self.loaded, self.explainers)  # explainers made on first use

    @classmethod
    def load(cls, model: str | Path | ModelFolder, *, backend: str = "auto", compile: bool | None = False,
             device: str | None = None, overrides: dict[str, Any] | None = None, plan=None,
             limits: ImageLimits = PREDICTION_LIMITS, explainers: int = 1) -> Predictor:
        """The model of a folder or MLflow URI (or an opened ModelFolder), scored as `plan` says (a ScoringPlan,
        decided by the caller), else as `backend`, `compile` and `device` make it (serving.backends.plan)."""
        folder = model if isinstance(model, ModelFolder) else ModelFolder.open(model, overrides)
        return cls(load_model(folder, plan or folder.plan(backend, device, compile)), limits, explainers)

    # ------------------------------------------------------------------ what it is

    @property
    def model_settings(self):
        return self.loaded.model_settings

    @property
    def task(self):
        return self.loaded.model_settings.task

    @property
    def labels(self) -> list[str]:
        return self.loaded.model_settings.labels

    @property
    def plan(self):
        return self.loaded.plan

    @property
    def backend(self) -> str:
        """What scores: "onnx" or "onnx-int8" (ONNX Runtime) or "torch"."""
        return self.plan.backend

    @property
    def compiled(self) -> bool:
        return self.plan.compiled

    @property
    def xai_parameters(self) -> type | None:
        """The xai_parameters this model's explanation entries take (classifiers': XaiParameters; detectors' and
        instance segmentation's: DetectionXaiParameters, D-RISE); None: it does not explain."""
        return xai_parameters_class(self.task.name)

    @property
    def explains(self) -> bool:
        """Whether this model answers explanation entries."""
        return self.xai_parameters is not None

    def description(self) -> dict[str, Any]:
        """What `/metadata` says of the model (on `visionserve serve` and the hub): task, labels, the settings in
        force, the per-request `parameters` and `xai_parameters`, what scores (`backend`, `compiled`, and
        `scoring_file`: model.pt, model.onnx or model.int8.onnx), and, where the folder has an INT8 file, what it
        costs as recorded at export (`int8`: settings.json's record and the `tolerance` `auto` allows)."""
        ms = self.model_settings
        int8 = {"int8": {**ms.int8.document(), "tolerance": TOLERANCE}} if ms.int8 is not None else {}
        return {"task": ms.task.name, "model_name": ms.model_name, "labels": ms.labels,
                "settings": as_dict(ms.settings, inference_only=True),
                **parameter_forms(ms.task.inference_cls, ms.settings, self.xai_parameters),
                "compiled": self.compiled, "backend": self.backend, "scoring_file": self.loaded.scoring_file, **int8}

    def settings_for(self, params: Mapping[str, Any] | None) -> Any:
        """The settings in force for one request: settings.json plus validated per-request overrides (a frozen,
        hashable settings object); SettingsError naming each refused parameter."""
        ms = self.model_settings
        given = {k: v for k, v in (params or {}).items() if v is not None}
        if not given:
            return ms.settings
        problems = per_request_problems(ms.task.inference_cls, given)
        if self.loaded.arch.fixed_input and given.get("valid_crop_size", ms.settings.valid_crop_size) != \
                ms.settings.valid_crop_size:
            problems.append(f"valid_crop_size: {ms.model_name} was built for {ms.settings.valid_crop_size}")
        if problems:
            raise SettingsError(problems, "request parameters")
        current = as_dict(ms.settings, inference_only=True)
        return inference_settings(ms.task, {**current, **given}, source="request parameters")

    # ------------------------------------------------------------------ scoring

    def score(self, images: Sequence[Probed | ImageError], settings: Any,
              rows: Sequence[int] | None = None) -> list[dict]:
        """One response per image (or the error it already has), in input order, under `settings` (settings_for's);
        `rows`: the row numbers error objects name (default 0, 1, ...)."""
        rows = rows if rows is not None else range(len(images))
        usable = [i for i, image in enumerate(images) if isinstance(image, Probed)]
        scored = self._score([images[i].size for i in usable],
                             lambda k, size: decode_tensor(images[usable[k]].data, self.limits, self.loaded.device,
                                                           size), settings)
        answers: dict[int, dict | ImageError] = dict(zip(usable, scored))
        out = []
        for i, image in enumerate(images):
            answer = answers.get(i, image)
            out.append(row_error(rows[i], answer) if isinstance(answer, ImageError) else answer)
        return out

    def predict_images(self, images: Sequence[Image.Image | torch.Tensor],
                       params: Mapping[str, Any] | None = None) -> list[dict]:
        """Responses for decoded images (RGB PIL or uint8 [3, H, W] tensors), in input order."""
        tensors = [to_tensor(im) if isinstance(im, Image.Image) else im for im in images]
        results = self._score([(t.shape[-1], t.shape[-2]) for t in tensors], lambda i, _: tensors[i],
                              self.settings_for(params))
        return [row_error(i, r) if isinstance(r, ImageError) else r for i, r in enumerate(results)]

    def _score(self, sizes: Sequence[tuple[int, int]], load: Callable[[int, Any], torch.Tensor],
               settings: Any) -> list[dict | ImageError]:
        """Score images of `sizes` (width, height), `batch_size` per forward pass (fewer for large inputs), loading
        each only when its batch comes (`load(i, size)` → uint8 [3, H, W], decoded no larger than `size`, the size
        the model needs), so memory holds one batch of model-sized pixels at a time. Images of similar shape are
        batched together (less padding for detectors); answers keep input order. One image's failure is its own:
        a batch that fails is scored again image by image."""
        ops = self.task.ops
        preprocess = ops.preprocess(settings)
        order = sorted(range(len(sizes)), key=lambda i: sizes[i][1] / sizes[i][0])
        results: list[dict | ImageError | None] = [None] * len(sizes)
        dtype = next(self.loaded.model.parameters()).dtype
        step = settings.images_per_pass()
        with torch.inference_mode():
            for start in range(0, len(sizes), step):
                batch = []
                for i in order[start:start + step]:
                    try:
                        size = ops.decode_size(settings, *sizes[i])
                        pixels = shrink(load(i, size).to(self.loaded.device, non_blocking=True), size)
                        batch.append((i, preprocess(pixels).to(dtype)))
                    except ImageError as exc:
                        results[i] = exc
                    except Exception:  # noqa: BLE001  (this image only; logged with its traceback)
                        log.exception("image %d: preprocessing failed", i)
                        results[i] = _FAILED
                if batch:
                    self._forward(batch, settings, results)
        return results

    def _forward(self, batch: list[tuple[int, torch.Tensor]], settings: Any, results: list) -> None:
        """Answers of one batch into `results` (boxes are fractions of the tensor the model saw); when the batch
        fails, each image alone."""
        ops = self.task.ops
        try:
            outputs = self.loaded.scorer.predict([x for _, x in batch], settings)
            answers = [ops.format(out, (x.shape[-1], x.shape[-2]), self.labels, settings)
                       for (_, x), out in zip(batch, outputs)]
        except Exception:  # noqa: BLE001
            if len(batch) > 1:
                for one in batch:
                    self._forward([one], settings, results)
                return
            log.exception("image %d: the model failed", batch[0][0])
            answers = [_FAILED]
        for (i, _), answer in zip(batch, answers):
            results[i] = answer

    def explain(self, images: Sequence[Probed | ImageError], xai: Sequence[Any], settings: Any,
                rows: Sequence[int], stop: threading.Event | None = None, deadline: float | None = None) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: the validated xai_parameters) per image, in input order; once
        `stop` is set, the images not yet explained are answered as stopped. `deadline` (time.monotonic()): when
        the caller stops waiting; D-RISE's time budget is capped by it."""
        return self._explanations.explain(images, xai, settings, rows, self.limits, stop, deadline)
