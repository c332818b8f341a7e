"""Training checkpoints: what they hold, how they are saved, and how training continues from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 1


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: Path, *, model: nn.Module, task: str, model_name: str, labels: list[str],
                    settings: dict[str, Any], epoch: int, metrics: dict[str, float]) -> Path:
    """Weights as a state_dict plus what is needed to rebuild the model (no pickled objects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"format": FORMAT, "task": task, "model_name": model_name, "labels": labels,
                "settings": settings, "epoch": epoch, "metrics": metrics, "model": state}, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint_path={path}: file not found") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"checkpoint_path={path}: not a readable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"checkpoint_path={path}: not a visionserve checkpoint")
    return ckpt


def download_run_checkpoint(run_id: str) -> Path:
    """The best checkpoint logged by an earlier MLflow run (`checkpoint_run_id`)."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt"))
    except Exception as exc:  # MLflow raises its own exception types for a missing run or artifact
        raise CheckpointError(f"checkpoint_run_id={run_id}: no checkpoints/best.pt in that MLflow run ({exc})") from None


def load_into(model: nn.Module, ckpt: dict[str, Any], *, task: str, labels: list[str], model_name: str) -> None:
    """Continue from `ckpt`: same task, architecture and labels, weights loaded strictly."""
    problems = []
    if ckpt["task"] != task:
        problems.append(f"the checkpoint is for {ckpt['task']}, not {task}")
    if ckpt["model_name"] != model_name:
        problems.append(f"the checkpoint is a {ckpt['model_name']}, not a {model_name} (set model_name={ckpt['model_name']})")
    if list(ckpt["labels"]) != list(labels):
        problems.append(f"the checkpoint's labels {ckpt['labels']} differ from the data's {labels}")
    if problems:
        raise CheckpointError("cannot continue training: " + "; ".join(problems))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
