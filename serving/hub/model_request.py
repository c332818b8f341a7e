"""What a PUT of a model asks for: its body checked, field by field, into the record the hub keeps (nothing is
written here: the caller writes it once every other check has passed too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serving.hub.api import ApiError, field, resource_name, section
from serving.hub.state import now

KIND_TASK = {"Generic-Classifier": "image_classification", "Generic-Detector": "image_object_detection",
             "Product-Recognizer": "image_object_detection"}
DATASET_KIND = {"imageClassification": "Generic-Classifier", "imageObjectDetection": "Generic-Detector"}
MAX_BUDGET = {"image_classification": 336, "image_object_detection": 1344}


def model_request(name: str, doc: dict[str, Any], dataset_of: Callable[[str], dict[str, Any] | None]) -> dict[str, Any]:
    """The new model's record from the PUT body (`dataset_of(name)`: a registered dataset, or None); a 400 naming
    the field otherwise."""
    params = section(doc, "trainingParameters")
    dataset_name = field(params, "trainingDatasetName")
    if dataset_name is None or dataset_name == "":
        raise ApiError(400, "InvalidArgument", "trainingParameters.trainingDatasetName is required",
                       "trainingDatasetName")
    dataset_name = resource_name(dataset_name, "trainingDatasetName", "dataset")
    budget = field(params, "timeBudgetInHours")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1344:
        raise ApiError(400, "InvalidArgument", f"trainingParameters.timeBudgetInHours={budget!r}: must be a number "
                       "in (0, 1344] (fractions such as 0.05 are accepted)", "timeBudgetInHours")
    dataset = dataset_of(dataset_name)
    kind = field(params, "modelKind") or (DATASET_KIND[dataset["annotationKind"]] if dataset else None)
    if kind is not None and (not isinstance(kind, str) or kind not in KIND_TASK):
        raise ApiError(400, "InvalidArgument", f"modelKind={kind!r}: must be one of {', '.join(KIND_TASK)}",
                       "modelKind")
    kind = kind or "Generic-Classifier"
    if budget > MAX_BUDGET[KIND_TASK[kind]]:
        raise ApiError(400, "InvalidArgument", f"timeBudgetInHours={budget}: at most "
                       f"{MAX_BUDGET[KIND_TASK[kind]]} for {kind}", "timeBudgetInHours")
    test = field(section(doc, "evaluationParameters"), "testDatasetName")
    test = resource_name(test, "testDatasetName", "dataset") if test not in (None, "") else None
    record = {"name": name, "createdDateTime": now(), "status": "notStarted",
              "trainingParameters": {"trainingDatasetName": dataset_name, "timeBudgetInHours": budget,
                                     "modelKind": kind}}
    if test:
        record["evaluationParameters"] = {"testDatasetName": test}
    return record
