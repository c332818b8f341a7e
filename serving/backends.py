"""What scores a model's images, decided once (a light module: the command line plans and prints this without
loading torch).

- `auto` (the default): on the CPU, a classifier whose folder has a model.int8.onnx scores on it when
  settings.json's `int8` record says it loses at most `models.int8_record.TOLERANCE` (one point) of the task's
  metric on the validation set, else on its model.onnx; anything else on torch. Measured on 2 CPUs, resnet18 at
  224: 17.1 ms per image at batch 1 on ONNX Runtime, 31.2 eager, and torch.compile's similar speed costs 15-25 s
  of start-up. Detectors stay on torch: a Faster R-CNN took 2.24 s on ONNX Runtime against 1.78 s in torch. On a
  GPU, torch.
- `torch`: the torch network, eager, or compiled for CPU classifiers where asked (serving.compiled);
- `onnx`: the folder's `artifacts/model.onnx` on ONNX Runtime (any task; serving.scorers);
- `onnx-int8`: its `artifacts/model.int8.onnx` (models.onnx_int8), whatever it lost; a folder without one is
  refused, pointing at `visionserve quantize`.

`plan` turns what was asked for (a backend name, whether to compile, a device) and what the model is into a
`ScoringPlan`: the backend, whether it is compiled, the device, and why. The command line makes it once, prints it
and hands it to the replicas, batch actors and the pyfunc as a value; none of them decides again.
Explanations always run on the torch network: they need gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from models.int8_record import INT8_FILE, TOLERANCE, Int8Record

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")
DEFAULT_BACKEND = "auto"
ENGINES = {"torch": "torch", "onnx": "ONNX Runtime", "onnx-int8": "ONNX Runtime, INT8"}
ONNX_BACKENDS = ("onnx", "onnx-int8")  # the backends that score an ONNX file

# Replicas that score on ONNX Runtime: torch's OpenMP threads, which run only the preprocessing there, wait
# without spinning, so that they leave the CPUs to ONNX Runtime's own threads. resnet18, 2 threads, one 640x480
# JPEG per call: 29.0 -> 22.4 ms per image (20.3 in batches of 8). Eager resnet18 is slower with it (28.6 -> 34.8
# ms); a Faster R-CNN is not (1.21 s either way), so the hub's replicas, which hold both, get it too.
ONNX_REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class ScoringPlan:
    """What scores a model: `backend` ("torch", "onnx" or "onnx-int8"), `compiled` (torch.compile, CPU classifiers
    only), on `device` ("cpu", "cuda", "cuda:1" ...), `why` (the rule `auto` followed, for the command line to
    print; empty when the backend was asked for by name), and `side_by_side`: a replica scores as many batches at
    once as it has CPUs, each call on the CPUs the others leave (a detector on torch on CPUs: much of a detector's
    pass is small operations that one thread runs as fast as two; SIDE_BY_SIDE)."""

    backend: str
    compiled: bool
    device: str
    why: str = ""
    side_by_side: bool = False  # batches score side by side on a replica's CPUs, one lane per CPU (serving.replica)

    @property
    def engine(self) -> str:
        """In words: "ONNX Runtime", "ONNX Runtime, INT8", "torch", "torch, compiled"."""
        return ENGINES[self.backend] + (", compiled" if self.compiled else "")

    @property
    def on_onnx(self) -> bool:
        """Whether an ONNX file scores (the folder's model.onnx, or its model.int8.onnx for onnx-int8)."""
        return self.backend in ONNX_BACKENDS

    def replica_env(self) -> dict[str, str]:
        """Environment variables a process scoring with this plan wants set before torch starts."""
        return dict(ONNX_REPLICA_ENV) if self.on_onnx else {}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class NoPlan(ValueError):
    """A backend that cannot score the model (a message saying why and what to use instead)."""


def _points(value: float) -> str:
    """A metric's difference in points (0.01 is one point)."""
    return f"{value * 100:.2g} point{'' if round(value * 100, 2) == 1 else 's'}"


def _int8_why(int8: Int8Record) -> str:
    """What the INT8 file loses, as recorded, against the tolerance."""
    within = "within" if int8.within_tolerance() else "over"
    lost = (f"loses {_points(int8.loss)} of {int8.metric}" if int8.difference < 0 else
            f"gains {_points(int8.difference)} of {int8.metric}" if int8.difference > 0 else
            f"loses no {int8.metric}")
    return f"it {lost} on the validation set, {within} the tolerance of {_points(TOLERANCE)}"


def _int8_allowed(has_int8: bool, int8: Int8Record | None) -> tuple[bool, str]:
    """Whether `auto` may score a CPU classifier on its INT8 file, and if not, why not (empty: no file to say
    anything of)."""
    if not has_int8:
        return False, ""
    if int8 is None:
        return False, f"; not {INT8_FILE}: settings.json records no loss for it"
    if not int8.within_tolerance():
        return False, f"; not {INT8_FILE}: {_int8_why(int8)}"
    return True, ""


def plan(asked: str, family: str, device: str, has_onnx: bool, *, compile: bool | None = None,
         onnx_missing_why: str = "", has_int8: bool = False, int8: Int8Record | None = None,
         int8_missing_why: str = "") -> ScoringPlan:
    """The plan for a model of task `family` ("classification", "detection", "segmentation") whose folder has a
    model.onnx or not (`onnx_missing_why`: why not, for the message), a model.int8.onnx or not (`int8`: settings.json's
    record of what it loses; `int8_missing_why`), scoring on `device`, when `asked` (BACKENDS).
    `compile`: True asks for a compiled classifier (so `auto` keeps a CPU classifier on torch), None compiles one
    when torch scores it anyway (`visionserve serve`'s default), False never; NoPlan when `asked` cannot be done."""
    if asked not in BACKENDS:
        raise NoPlan(f"backend {asked!r}: expected one of {', '.join(BACKENDS)}")
    cpu_classifier = device.split(":")[0] == "cpu" and family == "classification"
    if asked == "onnx" and not has_onnx:
        raise NoPlan(f"backend onnx: {onnx_missing_why or 'the model folder has no artifacts/model.onnx'}; use the "
                     "torch backend")
    if asked == "onnx-int8" and not has_int8:
        raise NoPlan(f"backend onnx-int8: {int8_missing_why or f'the model folder has no artifacts/{INT8_FILE}'}; "
                     "add it with `visionserve quantize MODEL_DIR --validation-data VALIDATION.jsonl`, or use the "
                     "onnx or torch backend")
    int8_ok, not_int8 = _int8_allowed(has_int8, int8)
    if asked != "auto":
        backend, why = asked, ""  # asked for by name: nothing to explain
    elif cpu_classifier and compile:
        backend, why = "torch", "auto: torch, since compiling was asked for"
    elif cpu_classifier and int8_ok:
        backend, why = "onnx-int8", f"auto: INT8 for a classifier on CPUs: {_int8_why(int8)}"
    elif cpu_classifier and has_onnx:
        backend, why = "onnx", f"auto: ONNX Runtime for a classifier on CPUs{not_int8}"
    else:
        backend, why = "torch", "auto: torch for a detector, on a GPU, or without a model.onnx"
    on_cpu = device.split(":")[0] == "cpu"
    return ScoringPlan(backend, backend == "torch" and cpu_classifier and compile is not False, device, why,
                       side_by_side=on_cpu and backend == "torch" and family != "classification")
