"""`xai_parameters` of an explanation request (scoring.md, Explanations): names, defaults, checks, and what each
method is (the words /metadata shows). Classifiers and detectors take different parameters: `xai_parameters_class`
picks the class for a task, `parse_xai` validates against it."""

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import field_validator

from models.errors import SettingsError
from models.tasks.fields import Flag, Float, Int, SettingsModel, Text, maybe, nested, one_of, param, parse_settings
from models.tasks.registry import TASKS, get_task

ALGORITHMS = ("xrai", "integrated_gradients", "guided_gradcam", "guided_backprop")  # classifiers
DETECTOR_ALGORITHMS = ("d_rise",)  # image_object_detection, image_instance_segmentation
APPROXIMATIONS = ("riemann_middle", "gausslegendre")
MAX_EXPLAINED_LABELS = 10  # per image (multilabel): each is a full attribution, seconds of work
MAX_EXPLAINED_DETECTIONS = 10  # per image (D-RISE): the masks are shared, but each is a map and a picture

# What each method explains and how far to trust it (bench/explain_quality.py measures the claims); /metadata shows
# these words as the documentation of `xai_algorithm`.
METHOD_NOTES = {
    "xrai": "regions ranked by integrated gradients from a black and a white baseline (the class probability)",
    "integrated_gradients": "path integral of the class probability's gradient from a black image; measured on the "
                            "demo classifier (issue 26) it barely beats, and on insertion loses to, a centre prior "
                            "that ignores the model: read it with care",
    "guided_gradcam": "GradCAM of the class logit on the last spatial stage times guided backprop",
    "guided_backprop": "gradient of the class logit with only non-negative gradients passed back",
    "d_rise": "D-RISE (Petsiuk et al. 2021): the detector scores randomly masked copies of the image; each mask "
              "is weighted by how well the masked image's best detection matches the explained one (box IoU x same "
              "label x score); the map is the mean weight of the masks that keep a pixel minus the mean weight: "
              "positive where seeing the pixel helps the detection. Hidden pixels take the mean colour the detector "
              "normalises by (black holes look like objects). On the tests' tiny detector its maxima fell inside the "
              "explained object's box and hiding pixels in its order removed the detection as fast as a box prior "
              "(bench/explain_quality.py)",
}


def _notes(names: tuple[str, ...]) -> str:
    return "which attribution method: " + "; ".join(f"{n}: {METHOD_NOTES[n]}" for n in names)


class XaiParameters(SettingsModel):
    """One image's explanation wishes for a classifier; the spec's names and defaults plus `internal_batch_size`."""

    xai_algorithm: one_of(*ALGORITHMS) = param("xrai", doc=_notes(ALGORITHMS))
    visualizations: Flag = param(True, doc="return the 2x2 PNG")
    attributions: Flag = param(False, doc="return the [3, crop, crop] pixel attributions")
    confidence_score_threshold_multilabel: Float = param(0.5, ge=0, le=1, doc="multilabel: explain prob >= this")
    n_steps: Int = param(50, ge=2, le=1000, doc="xrai / integrated_gradients approximation steps")
    xrai_fast: Flag = param(True, doc="xrai: the fast, less precise variant")
    approximation_method: one_of(*APPROXIMATIONS) = param("riemann_middle", doc="integrated_gradients rule")
    internal_batch_size: Int = param(16, ge=1, le=512, doc="visionserve: images per backward pass (steps x baselines)")


class TargetBox(SettingsModel):
    """A box the request names (to explain a miss): the response's box fields, fractions of the image."""

    label: Text = param("", doc="one of the model's labels")
    topX: Float = param(0.0, ge=0, le=1)
    topY: Float = param(0.0, ge=0, le=1)
    bottomX: Float = param(1.0, ge=0, le=1)
    bottomY: Float = param(1.0, ge=0, le=1)


class DetectionXaiParameters(SettingsModel):
    """One image's explanation wishes for a detector (D-RISE): which detections, how many masks, how long."""

    xai_algorithm: one_of(*DETECTOR_ALGORITHMS) = param("d_rise", doc=_notes(DETECTOR_ALGORITHMS))
    visualizations: Flag = param(True, doc="return one PNG per explained detection: the heat map over the image")
    attributions: Flag = param(False, doc="return one [height, width] saliency map per explained detection")
    max_explained_detections: Int = param(3, ge=0, le=MAX_EXPLAINED_DETECTIONS,
                                          doc="explain the highest-scoring detections, at most this many")
    detection_score_threshold: Float = param(0.0, ge=0, le=1, doc="explain only detections with score >= this")
    target_box: maybe(nested(TargetBox)) = param(
        None, doc="also explain this box and label (fractions of the image, as in the response), e.g. where the "
                  "model missed an object: the map shows what supports (or would support) a detection there")
    number_of_masks: Int = param(1000, ge=8, le=20000, doc="D-RISE: random masks (forward passes of the detector)")
    mask_resolution: Int = param(16, ge=2, le=64, doc="D-RISE: cells along each side of a mask before upsampling")
    mask_keep_probability: Float = param(0.5, ge=0.05, le=0.95, doc="D-RISE: chance that a mask cell shows the image")
    time_budget_s: Float = param(60.0, ge=0.1, le=3600, doc="D-RISE: stop drawing masks before a batch that would "
                                                            "end past this; the map uses the masks done (on a server, "
                                                            "at most its explanation_timeout_s, shared by the "
                                                            "request's images)")
    internal_batch_size: Int = param(8, ge=1, le=64, doc="visionserve: masked images per forward pass")

    @field_validator("target_box")
    @classmethod
    def _box_in_order(cls, box: TargetBox | None) -> TargetBox | None:
        if box is None:
            return None
        if not box.label:
            raise ValueError("label is required (one of the model's labels)")
        if box.bottomX <= box.topX or box.bottomY <= box.topY:
            raise ValueError(f"the box is empty: bottomX ({box.bottomX:g}) must exceed topX ({box.topX:g}) and "
                             f"bottomY ({box.bottomY:g}) topY ({box.topY:g})")
        return box


DEFAULT = XaiParameters()


# The xai_parameters of each task family (a family missing here does not explain).
BY_FAMILY: dict[str, type[SettingsModel]] = {"classification": XaiParameters, "detection": DetectionXaiParameters,
                                             "segmentation": DetectionXaiParameters}


def xai_parameters_class(task_name: str) -> type[SettingsModel] | None:
    """The xai_parameters a model of `task_name` takes (what /metadata and /docs describe for it); None: its
    models do not explain."""
    return BY_FAMILY.get(get_task(task_name).family)


def xai_parameter_schemas() -> dict[str, type[SettingsModel]]:
    """The xai_parameters of each task family of the registry, by the name the OpenAPI document gives it
    (`ClassificationXaiParameters`, ...), as `models.tasks.registry.request_params` names the request params."""
    families = dict.fromkeys(t.family for t in TASKS.values())
    return {f"{f.capitalize()}XaiParameters": BY_FAMILY[f] for f in families if f in BY_FAMILY}


def _something_explained(xai: SettingsModel) -> list[str]:
    if isinstance(xai, DetectionXaiParameters) and xai.max_explained_detections == 0 and xai.target_box is None:
        return ["max_explained_detections=0 and no target_box: nothing to explain; explain detections "
                "(max_explained_detections >= 1) or name a target_box"]
    return []


def label_problems(xai: SettingsModel, labels: Sequence[str]) -> list[str]:
    """What the model's `labels` refuse in validated parameters: a target box's label it does not have."""
    box = getattr(xai, "target_box", None)
    if box is None or box.label in labels:
        return []
    return [f"xai_parameters.target_box.label={box.label!r} is not a label of this model (its labels: "
            f"{', '.join(labels)})"]


def parse_xai(raw: Mapping[str, Any] | None, task_name: str = "image_classification") -> SettingsModel:
    """Validated parameters for a model of `task_name` (XaiParameters or DetectionXaiParameters);
    `SettingsError.problems` name each bad key as `xai_parameters.<key>...`."""
    cls = xai_parameters_class(task_name)
    if cls is None:
        raise SettingsError([f"xai_parameters: {task_name} models do not explain"], "xai_parameters")
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise SettingsError(["xai_parameters: expected a JSON object"], "xai_parameters")
    try:
        return parse_settings(cls, raw, source="xai_parameters", cross_check=_something_explained)
    except SettingsError as exc:
        raise SettingsError([f"xai_parameters.{p}" for p in exc.problems], "xai_parameters") from None
