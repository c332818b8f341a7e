"""`artifacts/model.int8.onnx`: the model's `model.onnx` statically quantized for CPUs (ONNX Runtime's
quantization: QDQ format, per-channel int8 weights, uint8 activations whose ranges are calibrated on training
images through the model's own preprocessing), with what it costs in accuracy measured on the validation set
and recorded in settings.json (the `int8` field: models.int8_record.Int8Record).

What is quantized: every Conv, Gemm and MatMul but the last layers, whose outputs are the answers (a
classifier's head, a detector's box/class predictors and RPN logits, a Mask R-CNN's mask predictor): they
cost little and their rounding would show in every score. What stays float: everything without an int8
kernel or whose values are data-dependent (a detector's anchors, TopK, NonMaxSuppression, RoiAlign, the
resize and the box decoding; attention's Softmax and LayerNorm). On the 2-core development machine (AVX-512
VNNI; bench/inference_throughput.py) resnet18 and resnet50 at 224 score about 3x the FP32 file's images/s.

The check when it is written, like model.onnx's: ONNX Runtime alone loads the file and scores the whole
(capped) validation set with it and with the FP32 file, every output finite and shaped as the FP32 one's;
a file that fails is not written (a warning says why: the folder is complete without it). The record says
by how much the two disagree, so that a loader decides whether the loss is acceptable (`within_tolerance`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.int8_record import INT8_FILE, Int8Record
from models.onnx_export import DETECTION_OUTPUTS, INPUT, ONNX_FILE, OUTPUT, exportable

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# Nodes left in float whatever their type: the layers whose outputs are the answers (names as torch's
# exporter writes them: the module path)
FLOAT_LAYERS = ("cls_logits", "bbox_pred", "bbox_reg", "box_predictor", "mask_predictor")
# The operators that stay float in a detector's graph and cost time (the record lists those present)
FLOAT_OPS = ("RoiAlign", "NonMaxSuppression", "TopK", "Resize", "Softmax", "LayerNormalization", "ConvTranspose")
CALIBRATION_IMAGES = {"classification": 32, "detection": 8}  # more widens MinMax ranges, and takes longer
VALIDATION_IMAGES = {"classification": 500, "detection": 50}  # the most each file scores at export
_FEED_BATCH = 8  # classifier images per calibration or validation run
# Families quantized at every training export. A detector's INT8 file is made on request (`visionserve quantize`):
# its graph runs the box head on 1,000 proposals whatever the image size, 0.5-1 s a run here even for the
# tests' 128 px models, so that calibrating and scoring both files adds 10-25 s to a tiny detector's export
# (minutes at 640x480 on a real validation set), where a classifier's adds 1-3 s.
AT_EXPORT = ("classification",)


@dataclass(frozen=True)
class QuantizationData:
    """The labelled images quantization needs (models.data.records.Record): `calibration` sets the activation
    ranges (training images), `validation` is scored with both files; at most `calibration_images` and
    `validation_images` of them, evenly spread (None: CALIBRATION_IMAGES / VALIDATION_IMAGES of the family)."""

    calibration: Sequence[Any]
    validation: Sequence[Any]
    calibrated_on: str = "training"  # or "validation" (then the measured loss is the optimistic one)
    calibration_images: int | None = None
    validation_images: int | None = None

    def chosen(self, family: str) -> tuple[list[Any], list[Any]]:
        """The calibration and validation records used for a model of `family`."""
        family = "classification" if family == "classification" else "detection"
        return (_spread(self.calibration, self.calibration_images or CALIBRATION_IMAGES[family]),
                _spread(self.validation, self.validation_images or VALIDATION_IMAGES[family]))


def quantized_at_export(task: Any) -> bool:
    """Whether a training of `task` (models.tasks.registry.Task) writes a model.int8.onnx with its folder."""
    return task.family in AT_EXPORT


def write_int8(folder: str | Path, model_settings: Any, data: QuantizationData) -> Int8Record | None:
    """`folder`/model.int8.onnx from `folder`/model.onnx (`make_int8`); None (with a warning, and no file)
    when the graph does not quantize or the check fails: the folder is complete without it."""
    folder = Path(folder)
    try:
        return make_int8(folder / ONNX_FILE, folder / INT8_FILE, model_settings, data)
    except Exception as exc:  # noqa: BLE001  (an optional artifact)
        log.warning("no %s for %s: %s: %s", INT8_FILE, model_settings.model_name, type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0])
        return None


def make_int8(source: Path, target: Path, model_settings: Any, data: QuantizationData) -> Int8Record:
    """`target` quantized from the FP32 ONNX file `source`, calibrated and checked on `data` (`compare`): its
    record. Raises (and leaves no `target`) when the graph does not quantize or the check fails."""
    if not exportable(model_settings.task) or not Path(source).is_file():
        raise ValueError(f"no {ONNX_FILE} to quantize")
    calibration, validation = data.chosen(model_settings.task.family)
    if not calibration or not validation:
        raise ValueError("no calibration or no validation images")
    try:
        quantize(Path(source), Path(target), model_settings, calibration)
        record = compare(Path(source), Path(target), model_settings, validation, calibrated_on=data.calibrated_on,
                         calibration_images=len(calibration))
    except BaseException:
        Path(target).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %s %.4f -> %.4f on %d validation images)", INT8_FILE, model_settings.model_name,
             record.metric, record.fp32, record.int8, record.images)
    return record


def quantize(source: Path, target: Path, model_settings: Any, calibration: Sequence[Any]) -> None:
    """`source` (an FP32 model.onnx) statically quantized into `target` (QDQ, per-channel int8 weights, uint8
    activations calibrated by MinMax on `calibration` records), with `source`'s metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_root_logger():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX Runtime's optimizer folds the exporter's Identity nodes into initializers (so that biases quantize)
        # and fuses. Without shape inference: the quantized graphs of resnet18 and a Faster R-CNN came out the same
        # with it, which took 1.3 s (ONNX's) and, for a detector, gave up after a minute leaving a file in the
        # working directory (ONNX Runtime's symbolic one)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, skip_onnx_shape=True)
        graph = onnx.load(str(prepared))
        excluded = [node.name for node in graph.graph.node if _answers(node, graph)]
        feeds = _Feeds([array for array, _ in _inputs(model_settings, calibration)])
        quantize_static(str(prepared), str(target), feeds,
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": 1},
                        calibration_providers=["CPUExecutionProvider"])
    quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    for prop in onnx.load(str(source), load_external_data=False).metadata_props:
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="quantization", value=json.dumps(
        {"format": "QDQ", "weights": "int8, per channel", "activations": "uint8, MinMax calibration",
         "calibration_images": len(calibration)}))
    onnx.save(quantized, str(target))


def _answers(node: Any, graph: Any) -> bool:
    """Whether `node` is one of the layers whose outputs are the answers (left in float)."""
    if node.op_type not in QUANTIZED_OPS:
        return False
    outputs = {o.name for o in graph.graph.output}
    return any(part in node.name for part in FLOAT_LAYERS) or bool(outputs & set(node.output))


class _Feeds:
    """ONNX Runtime's CalibrationDataReader over input arrays, read a range at a time: with the
    `CalibStridedMinMax` option the calibrator keeps one range's intermediate outputs at a time (its
    `CalibMaxIntermediateOutputs` would throw the collected ones away unmeasured in onnxruntime 1.32)."""

    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self.inputs = list(inputs)
        self.position, self.end = 0, len(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.inputs))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        self.position += 1
        return {INPUT: self.inputs[self.position - 1]}


def _spread(records: Sequence[Any], n: int) -> list[Any]:
    """At most `n` of `records`, evenly spread (a file's classes often come in runs)."""
    if len(records) <= n:
        return list(records)
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, n)]


def _dataset(model_settings: Any, records: Sequence[Any]):
    """(input, target) pairs through the model's own evaluation preprocessing."""
    return model_settings.task.ops.dataset(records, model_settings.labels, model_settings.settings, train=False)


def _inputs(model_settings: Any, records: Sequence[Any]) -> Iterator[tuple[np.ndarray, list[Any]]]:
    """(what the ONNX graph takes, the targets of the images in it): a classifier's batches of _FEED_BATCH
    crops, a detector's images one by one."""
    dataset = _dataset(model_settings, records)
    step = _FEED_BATCH if model_settings.task.family == "classification" else 1
    for start in range(0, len(dataset), step):
        items = [dataset[i] for i in range(start, min(start + step, len(dataset)))]
        if step == 1:
            yield items[0][0].numpy(), [items[0][1]]
        else:
            yield np.stack([image.numpy() for image, _ in items]), [target for _, target in items]


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on `path` (`threads`: intra-op threads, None: ONNX Runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not the quantized graph's notes on shapes it could not infer
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(fp32_path: Path, int8_path: Path, model_settings: Any, validation: Sequence[Any], *,
            calibrated_on: str, calibration_images: int) -> Int8Record:
    """Both files scored on the `validation` records: the record; a ValueError when the INT8 file's outputs
    are not finite or not shaped as the FP32 file's."""
    import onnx

    fp32, int8 = session(fp32_path), session(int8_path)
    score = _classifier_scores if model_settings.task.family == "classification" else _detector_scores
    nodes = onnx.load(str(int8_path)).graph.node
    return Int8Record(**score(fp32, int8, model_settings, validation), images=len(validation),
                      calibration_images=calibration_images, calibrated_on=calibrated_on,
                      quantized=_quantized_ops(nodes), float_ops=_float_ops(nodes))


def _quantized_ops(nodes: Sequence[Any]) -> dict[str, int]:
    """Operator → nodes whose weights come out of a DequantizeLinear (they run as int8 kernels once fused)."""
    dequantized = {o for node in nodes if node.op_type == "DequantizeLinear" for o in node.output}
    found = Counter(node.op_type for node in nodes
                    if node.op_type in QUANTIZED_OPS and len(node.input) > 1 and node.input[1] in dequantized)
    return dict(sorted(found.items()))


def _float_ops(nodes: Sequence[Any]) -> dict[str, int]:
    dequantized = {o for node in nodes if node.op_type == "DequantizeLinear" for o in node.output}
    found = Counter(node.op_type for node in nodes
                    if node.op_type in FLOAT_OPS or (node.op_type in QUANTIZED_OPS and (
                        len(node.input) < 2 or node.input[1] not in dequantized)))
    return dict(sorted(found.items()))


def _checked(name: str, got: np.ndarray, want: np.ndarray) -> np.ndarray:
    if got.shape[1:] != want.shape[1:] or not np.isfinite(got).all():
        raise ValueError(f"the INT8 file's {name} is shaped {list(got.shape)} or not finite where the FP32 "
                         f"file's is {list(want.shape)}")
    return got


def _classifier_scores(fp32: Any, int8: Any, model_settings: Any, records: Sequence[Any]) -> dict[str, Any]:
    import torch

    from models.tasks import metrics

    multilabel = model_settings.task.ops.multilabel
    scores: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    targets = []
    for batch, batch_targets in _inputs(model_settings, records):
        want = fp32.run([OUTPUT], {INPUT: batch})[0]
        got = _checked(OUTPUT, int8.run([OUTPUT], {INPUT: batch})[0], want)
        for key, logits in (("fp32", want), ("int8", got)):
            logits = torch.from_numpy(logits).double()
            scores[key].append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).numpy())
        targets += [torch.as_tensor(t) for t in batch_targets]
    probs = {key: np.concatenate(value) for key, value in scores.items()}
    truth = torch.stack(targets).numpy()
    measure = metrics.multilabel_metrics if multilabel else metrics.classification_metrics
    primary = model_settings.task.primary_metric
    value = {key: measure(p, truth, model_settings.labels)[primary] for key, p in probs.items()}
    if multilabel:
        agreement = float(((probs["fp32"] >= 0.5) == (probs["int8"] >= 0.5)).mean())
    else:
        agreement = float((probs["fp32"].argmax(1) == probs["int8"].argmax(1)).mean())
    return {"metric": primary, "fp32": value["fp32"], "int8": value["int8"],
            "difference": value["int8"] - value["fp32"], "agreement": agreement,
            "largest_score_difference": float(np.abs(probs["fp32"] - probs["int8"]).max())}


def _detector_scores(fp32: Any, int8: Any, model_settings: Any, records: Sequence[Any]) -> dict[str, Any]:
    import torch

    from models.tasks.detection_metrics import detection_metrics

    names = list(DETECTION_OUTPUTS)
    predictions: dict[str, list[dict]] = {"fp32": [], "int8": []}
    targets, found, kept = [], 0, 0
    for image, (target,) in _inputs(model_settings, records):
        want = fp32.run(names, {INPUT: image})
        got = [_checked(name, g, w) for name, g, w in zip(names, int8.run(names, {INPUT: image}), want)]
        for key, outputs in (("fp32", want), ("int8", got)):
            predictions[key].append({name: torch.from_numpy(value) for name, value in zip(names, outputs)})
        targets.append({k: v.as_subclass(torch.Tensor) for k, v in target.items() if k != "masks"})
        matched, total = _matched_detections(predictions["fp32"][-1], predictions["int8"][-1])
        found, kept = found + matched, kept + total
    s = model_settings.settings
    value = {key: detection_metrics(p, targets, model_settings.labels, metric_type="voc", iou_threshold=0.5,
                                    score_threshold=s.box_score_thresh,
                                    max_detections=s.box_detections_per_img)["mean_average_precision"]
             for key, p in predictions.items()}
    return {"metric": "mean_average_precision", "fp32": value["fp32"], "int8": value["int8"],
            "difference": value["int8"] - value["fp32"], "agreement": found / kept if kept else 1.0,
            "largest_score_difference": None}


def _matched_detections(want: dict, got: dict) -> tuple[int, int]:
    """(how many of `want`'s detections `got` has too: same label, IoU >= 0.5, each matched once; how many
    `want` has)."""
    from torchvision.ops import box_iou

    if not len(want["boxes"]) or not len(got["boxes"]):
        return 0, len(want["boxes"])
    iou = box_iou(want["boxes"], got["boxes"])
    iou[want["labels"][:, None] != got["labels"][None, :]] = 0
    matched = 0
    for row in iou:  # the FP32 detections in descending score
        j = int(row.argmax())
        if row[j] >= 0.5:
            matched += 1
            iou[:, j] = 0
    return matched, len(want["boxes"])


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantization logs its advice through the root logger ("please consider pre-processing",
    a bias it found no initializer for): quiet while quantizing, as the exporter's notes are."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
