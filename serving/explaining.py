"""Explanations of a model's answers for the pyfunc, the endpoint and batch scoring, on private copies of the
model, so scoring is not held up; as many at once as there are copies.

- Classifiers: XRAI, integrated gradients, guided GradCAM / backprop on a guided copy (explain.make_explainer).
- Detectors and instance segmentation: D-RISE (explain.explain_detections) through the model's own scorer over a
  private copy of the network (`scorer.on(explain.detector_copy(model))`: the torch network, or the ONNX Runtime
  graph where it follows the settings). The answer itself comes from the scorer that scores plain requests, so an
  explained image's boxes (and polygons) are those a plain request gets.

A server hands each explanation a deadline (its explanation_timeout_s): D-RISE's time budget is capped by what is
left of it, shared by the images still to explain, so a long budget ends with the masks done rather than a 504.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from explain import Stopped, TooManyLabels, UnknownLabel, detector_copy, explain_crop, explain_detections, make_explainer
from models.data.formats import ImageLimits
from models.data.images import Probed, decode_tensor, shrink
from models.errors import ErrorCode, ImageError
from models.tasks.classification import eval_crop
from serving.contract import row_error
from serving.loading import LoadedModel

STOPPED = ImageError(ErrorCode.EXPLANATION_TIMEOUT, "not explained: the request stopped waiting")
DEADLINE_SHARE = 0.85  # of the time left before the deadline, what D-RISE's masks may use (the rest: rendering)


class Explanations:
    """Up to `copies` explainers of one loaded model (a guided classifier, or a detector's scorer over a private
    network), each made on first use; an explanation takes one for its duration (so `copies` run at once and the
    rest wait) and gives it back."""

    def __init__(self, loaded: LoadedModel, copies: int = 1):
        self.loaded, self.copies = loaded, max(1, copies)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()

    def _make(self) -> Any:
        loaded, ms = self.loaded, self.loaded.model_settings
        if ms.task.is_classification:
            return make_explainer(loaded.model, loaded.arch.name, ms.task.multilabel, loaded.device,
                                  ms.settings.image_mean, ms.settings.image_std)
        return loaded.scorer.on(detector_copy(loaded.model).to(loaded.device))

    def _take(self) -> Any:
        with self._lock:
            if self._idle.empty() and self._made < self.copies:
                self._made += 1
                return self._make()
        return self._idle.get()

    def explain(self, items: Sequence[Probed | ImageError], xai: Sequence[Any], settings: Any, rows: Sequence[int],
                limits: ImageLimits, stop: threading.Event | None = None, deadline: float | None = None) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: the task's validated xai_parameters) per image, in input
        order; once `stop` is set, what is left is answered as not explained. `deadline`: time.monotonic() by
        which the caller stops waiting (D-RISE's budget is capped by it)."""
        stopped = stop.is_set if stop is not None else (lambda: False)
        one = self._crop if self.loaded.model_settings.task.is_classification else self._detections
        out = []
        explainer = self._take()
        try:
            for k, (row, item, wishes) in enumerate(zip(rows, items, xai)):
                try:
                    if stopped():
                        raise Stopped
                    if isinstance(item, ImageError):
                        raise item
                    share = _share(deadline, len(items) - k)
                    out.append(one(explainer, item, wishes, settings, limits, stopped, share))
                except ImageError as exc:
                    out.append(row_error(row, exc))
                except (TooManyLabels, UnknownLabel) as exc:
                    out.append(row_error(row, ImageError(ErrorCode.INVALID_XAI_PARAMETERS, str(exc))))
                except Stopped:
                    out.append(row_error(row, STOPPED))
        finally:
            self._idle.put(explainer)
        return out

    def _pixels(self, item: Probed, settings: Any, limits: ImageLimits) -> torch.Tensor:
        """The image decoded at the size the model needs, uint8 [3, H, W]."""
        size = self.loaded.model_settings.task.ops.decode_size(settings, *item.size)
        return decode_tensor(item.data, limits, self.loaded.device, size)

    def _crop(self, explainer: Any, item: Probed, xai: Any, settings: Any, limits: ImageLimits,
              stopped: Callable[[], bool], time_left: Callable[[], float | None]) -> dict:
        ms = self.loaded.model_settings
        with torch.inference_mode():
            pixels = eval_crop(settings)(self._pixels(item, settings, limits))
        probs, extra = explain_crop(explainer, pixels, ms.labels, xai, stopped)
        return {**ms.task.ops.format(probs, (0, 0), ms.labels, settings), **extra}

    def _detections(self, scorer: Any, item: Probed, xai: Any, settings: Any, limits: ImageLimits,
                    stopped: Callable[[], bool], time_left: Callable[[], float | None]) -> dict:
        """The answer plain scoring gives (the shared scorer), then D-RISE through the private `scorer`."""
        ms, ops = self.loaded.model_settings, self.loaded.model_settings.task.ops
        dtype = next(self.loaded.model.parameters()).dtype
        with torch.inference_mode():
            size = ops.decode_size(settings, *item.size)  # as Predictor scores it, so the boxes are the same
            image = ops.preprocess(settings)(shrink(self._pixels(item, settings, limits), size))
            prediction = self.loaded.scorer.predict([image.to(dtype)], settings)[0]
        answer = ops.format(prediction, (image.shape[-1], image.shape[-2]), ms.labels, settings)
        if (left := time_left()) is not None:
            xai = xai.model_copy(update={"time_budget_s": max(0.0, min(xai.time_budget_s, DEADLINE_SHARE * left))})
        explained = explain_detections(scorer, image.float(), prediction, ms.labels, xai, settings, stopped)
        for item in explained["explained_boxes"]:  # a detection's box exactly as the answer writes it
            if item["detection"] is not None:
                item["box"] = answer["boxes"][item["detection"]]["box"]
        return {**answer, **explained}


def _share(deadline: float | None, images_left: int) -> Callable[[], float | None]:
    """This image's share of the time left before `deadline` (None: no deadline), when it is asked."""
    return lambda: None if deadline is None else (deadline - time.monotonic()) / images_left
