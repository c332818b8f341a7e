"""Explanations of a classifier's answers (XRAI, integrated gradients, guided GradCAM / backprop) for
the pyfunc, the endpoint and batch scoring: on private guided copies of the model, so scoring is not
held up; as many at once as there are copies."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from explain import Stopped, TooManyLabels, explain_crop, make_explainer
from models.data.formats import ImageLimits
from models.data.images import Probed, decode_tensor
from models.errors import ErrorCode, ImageError
from models.tasks.classification import eval_crop
from serving.contract import row_error
from serving.loading import LoadedModel

STOPPED = ImageError(ErrorCode.EXPLANATION_TIMEOUT, "not explained: the request stopped waiting")


def unsupported(task_name: str) -> ImageError:
    return ImageError(ErrorCode.EXPLANATIONS_UNSUPPORTED, "explanations are for classification models only; this "
                      f"{task_name} model can only score (set model_explainability to false)")


class Explanations:
    """Up to `copies` explainers of one loaded classifier, each made on first use; an explanation takes one
    for its duration (so `copies` run at once and the rest wait) and gives it back."""

    def __init__(self, loaded: LoadedModel, copies: int = 1):
        self.loaded, self.copies = loaded, max(1, copies)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._lock = threading.Lock()

    def _take(self) -> Any:
        with self._lock:
            if self._idle.empty() and self._made < self.copies:
                self._made += 1
                ms = self.loaded.model_settings
                return make_explainer(self.loaded.model, self.loaded.arch.name, ms.task.multilabel,
                                      self.loaded.device, ms.settings.image_mean, ms.settings.image_std)
        return self._idle.get()

    def explain(self, items: Sequence[Probed | ImageError], xai: Sequence[Any], settings: Any, rows: Sequence[int],
                limits: ImageLimits, stop: threading.Event | None = None) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: explain.XaiParameters) per image, in input order; once
        `stop` is set, what is left is answered as not explained."""
        ms = self.loaded.model_settings
        if not ms.task.is_classification:
            return [row_error(r, unsupported(ms.task.name)) for r in rows]
        crop = eval_crop(settings)
        stopped = stop.is_set if stop is not None else (lambda: False)
        out = []
        explainer = self._take()
        try:
            for row, item, wishes in zip(rows, items, xai):
                try:
                    if stopped():
                        raise Stopped
                    if isinstance(item, ImageError):
                        raise item
                    size = ms.task.ops.decode_size(settings, *item.size)
                    with torch.inference_mode():
                        pixels = crop(decode_tensor(item.data, limits, self.loaded.device, size))
                    probs, extra = explain_crop(explainer, pixels, ms.labels, wishes, stopped)
                    out.append({**ms.task.ops.format(probs, (0, 0), ms.labels, settings), **extra})
                except ImageError as exc:
                    out.append(row_error(row, exc))
                except TooManyLabels as exc:
                    out.append(row_error(row, ImageError(ErrorCode.INVALID_XAI_PARAMETERS, str(exc))))
                except Stopped:
                    out.append(row_error(row, STOPPED))
        finally:
            self._idle.put(explainer)
        return out
