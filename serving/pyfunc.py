"""The MLflow pyfunc of every exported model: `mlflow.pyfunc.load_model(DIR).predict(df)`."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from models.values import to_flag
from serving.contract import RequestError
from serving.loading import ModelFolder
from serving.predictor import Predictor
from serving.scoring import Scoring

log = logging.getLogger(__name__)


def image_rows(model_input: Any) -> list[Any]:
    """The `image` column of a DataFrame (or a plain list / Series / dict of base64 strings)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            if len(model_input.columns) == 1:
                return model_input.iloc[:, 0].tolist()
            raise ValueError(f"expected a column named 'image', got columns {list(model_input.columns)}")
        return model_input["image"].tolist()
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict) and "image" in model_input:
        value = model_input["image"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise ValueError(f"expected a DataFrame with an 'image' column of base64 strings, got {type(model_input).__name__}")


class VisionModel(mlflow.pyfunc.PythonModel):
    """Loads `artifacts/settings.json` + `artifacts/model.pt`; answers one response per image row through the
    scoring core (serving.scoring), as every route does: a bad row gets its error object, the others their answers.

    By default (`backend: auto`, serving.backends) a classifier on the CPU scores on ONNX Runtime, on its
    `artifacts/model.int8.onnx` when the loss recorded for it is within tolerance, else on its `model.onnx`, and
    anything else on torch; `model_config={"backend": "onnx"}` asks for ONNX Runtime (any task, serving.scorers),
    `{"backend": "onnx-int8"}` for the INT8 file, `{"backend": "torch"}` for torch, and `{"compile": True}` for a
    classifier compiled for the CPU while loading (serving.compiled: worth it in a process that scores for a long
    time)."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        folder = ModelFolder.of_artifacts(Path(context.artifacts["settings"]).parent)
        scoring = folder.plan(str(config.get("backend", "auto")), compile=to_flag(config.get("compile", False)))
        self.scoring = Scoring(Predictor.load(folder, plan=scoring))

    @property
    def predictor(self):
        return self.scoring.predictor

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict]:
        """One response per image row; `params` may override inference settings for this call. Refusals are
        MlflowExceptions without a traceback: a 400 from `mlflow models serve` for bad input, a 500 naming a
        log id for our own failure (the traceback goes to the log, never into a response)."""
        try:
            return self.scoring.score_rows(image_rows(model_input), params)
        except (RequestError, ValueError) as exc:  # a bad parameter, explanation wish or frame: the caller's input
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception:  # noqa: BLE001
            log_id = uuid.uuid4().hex
            log.exception("scoring failed (log id %s)", log_id)
            raise MlflowException(f"internal error while scoring; the server log has the details (log id {log_id})",
                                  error_code=INTERNAL_ERROR) from None
