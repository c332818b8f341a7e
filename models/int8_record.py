"""settings.json's `int8` field: what a folder's `artifacts/model.int8.onnx` (models.onnx_int8) costs, as measured
on the validation set when it was written, and the tolerance within which a loader may choose it by itself.
Light (the standard library and models.errors): the backends that choose a scorer read it without loading ONNX.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from models.errors import SettingsError

INT8_FILE = "model.int8.onnx"
# The most a model may lose in its primary metric (accuracy, IoU, mAP; 0.01 is one point) for a loader to
# choose the INT8 file by itself; a user may still ask for it by name whatever it lost.
TOLERANCE = 0.01


@dataclass(frozen=True)
class Int8Record:
    """settings.json's `int8`: the INT8 file and what it costs, measured on the validation set as it was
    written. `fp32` / `int8` are the task's primary metric (accuracy, iou, or voc mAP@0.5 on boxes) of each
    file, `difference` = int8 - fp32 (negative: a loss; 0.01 is one point). `agreement`: the share of
    images whose top label is the same (multi-label: of image-label decisions at 0.5; detectors: of the FP32
    file's detections that the INT8 file also finds, same label at IoU >= 0.5); `largest_score_difference`:
    the largest difference of a probability (None for detectors)."""

    metric: str
    fp32: float
    int8: float
    difference: float
    agreement: float
    largest_score_difference: float | None
    images: int
    calibration_images: int
    calibrated_on: str = "training"
    file: str = INT8_FILE
    quantized: dict[str, int] = field(default_factory=dict)  # operator → nodes computing in int8
    float_ops: dict[str, int] = field(default_factory=dict)  # costly operators left in float → nodes

    @property
    def loss(self) -> float:
        """What the INT8 file gives up in the primary metric (0 when it does as well or better)."""
        return max(0.0, -self.difference)

    def within_tolerance(self, tolerance: float = TOLERANCE) -> bool:
        return self.loss <= tolerance + 1e-9

    def document(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_document(cls, doc: Any, source: str) -> Int8Record:
        """settings.json's `int8` value, checked (a SettingsError names each wrong field)."""
        if not isinstance(doc, dict):
            raise SettingsError(["int8: expected an object (what quantization recorded)"], source)
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        problems = [f"int8.{name}: missing" for name in sorted(required - set(doc))]
        problems += [f"int8.{name}: {need}" for (name, need), check in _RECORD_CHECKS.items()
                     if name in doc and not check(doc[name])]
        if doc.get("file", INT8_FILE) != INT8_FILE:
            problems.append(f"int8.file: expected {INT8_FILE!r}")
        unknown = sorted(set(doc) - {f.name for f in fields(cls)})
        problems += [f"int8.{name}: unknown field" for name in unknown]
        if problems:
            raise SettingsError(problems, source)
        return cls(**doc)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _op_counts(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _count(v) for k, v in value.items())


_RECORD_CHECKS: dict[tuple[str, str], Any] = {
    ("metric", "expected the metric's name"): lambda v: isinstance(v, str),
    **{(name, "expected a number"): _number for name in ("fp32", "int8", "difference", "agreement")},
    ("largest_score_difference", "expected a number or null"): lambda v: v is None or _number(v),
    **{(name, "expected a whole number"): _count for name in ("images", "calibration_images")},
    ("calibrated_on", "expected 'training' or 'validation'"): lambda v: v in ("training", "validation"),
    **{(name, "expected an object of operator counts"): _op_counts for name in ("quantized", "float_ops")},
}
