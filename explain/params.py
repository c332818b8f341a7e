"""`xai_parameters` of an explanation request (scoring.md, Explanations): names, defaults, checks."""

from collections.abc import Mapping
from typing import Any

from models.errors import SettingsError
from models.tasks.fields import Flag, Float, Int, SettingsModel, one_of, param, parse_settings

ALGORITHMS = ("xrai", "integrated_gradients", "guided_gradcam", "guided_backprop")
APPROXIMATIONS = ("riemann_middle", "gausslegendre")
MAX_EXPLAINED_LABELS = 10  # per image (multilabel): each is a full attribution, seconds of work


class XaiParameters(SettingsModel):
    """One image's explanation wishes; the spec's names and defaults plus `internal_batch_size`."""

    xai_algorithm: one_of(*ALGORITHMS) = param("xrai", doc="which attribution method")
    visualizations: Flag = param(True, doc="return the 2x2 PNG")
    attributions: Flag = param(False, doc="return the [3, crop, crop] pixel attributions")
    confidence_score_threshold_multilabel: Float = param(0.5, ge=0, le=1, doc="multilabel: explain prob >= this")
    n_steps: Int = param(50, ge=2, le=1000, doc="xrai / integrated_gradients approximation steps")
    xrai_fast: Flag = param(True, doc="xrai: the fast, less precise variant")
    approximation_method: one_of(*APPROXIMATIONS) = param("riemann_middle", doc="integrated_gradients rule")
    internal_batch_size: Int = param(16, ge=1, le=512, doc="visionserve: images per backward pass (steps x baselines)")


DEFAULT = XaiParameters()


def parse_xai(raw: Mapping[str, Any] | None) -> XaiParameters:
    """Validated parameters; `SettingsError.problems` name each bad key as `xai_parameters.<key>...`."""
    if raw is None:
        return DEFAULT
    if not isinstance(raw, Mapping):
        raise SettingsError(["xai_parameters: expected a JSON object"], "xai_parameters")
    try:
        return parse_settings(XaiParameters, raw, source="xai_parameters")
    except SettingsError as exc:
        raise SettingsError([f"xai_parameters.{p}" for p in exc.problems], "xai_parameters") from None
