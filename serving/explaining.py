"""Explanations of a classifier's answers (XRAI, integrated gradients, guided GradCAM / backprop) for
the pyfunc, the endpoint and batch scoring: on a private guided copy of the model, one image at a time,
so scoring is not held up."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from models.data.formats import ImageLimits
from models.data.images import decode_tensor
from models.errors import ErrorCode, ImageError
from serving.contract import row_error
from serving.loading import LoadedModel


def unsupported(task_name: str) -> ImageError:
    return ImageError(ErrorCode.EXPLANATIONS_UNSUPPORTED, "explanations are for classification models only; this "
                      f"{task_name} model can only score (set model_explainability to false)")


class Explanations:
    """The explainer of one loaded classifier, made on first use; one explanation runs at a time."""

    def __init__(self, loaded: LoadedModel, limits: ImageLimits):
        self.loaded, self.limits = loaded, limits
        self._explainer: Any = None  # explain.Explainer
        self._lock = threading.Lock()

    def explain(self, items: Sequence[bytes | ImageError], xai: Sequence[Any], settings: Any,
                rows: Sequence[int]) -> list[dict]:
        """Scoring keys plus explanations (`xai[i]`: explain.XaiParameters) per image, in input order."""
        from explain import explain_crop, make_explainer
        from models.tasks.classification import eval_crop

        spec = self.loaded.spec
        if not spec.task.is_classification:
            return [row_error(r, unsupported(spec.task.name)) for r in rows]
        crop = eval_crop(settings)
        out = []
        with self._lock:
            if self._explainer is None:
                self._explainer = make_explainer(self.loaded.model, self.loaded.arch.name, spec.task.ops.multilabel,
                                                 self.loaded.device)
            for row, item, wishes in zip(rows, items, xai):
                try:
                    if isinstance(item, ImageError):
                        raise item
                    with torch.inference_mode():  # decode_tensor checks bytes and size from the header first
                        pixels = crop(decode_tensor(item, self.limits, self.loaded.device))
                    probs, extra = explain_crop(self._explainer, pixels, spec.labels, wishes)
                    out.append({**spec.task.ops.format(probs, (0, 0), spec.labels, settings), **extra})
                except ImageError as exc:
                    out.append(row_error(row, exc))
        return out
