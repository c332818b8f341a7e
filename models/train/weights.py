"""Pretrained weights: the architecture's own (`DEFAULT`: torchvision's weights enum, or timm's weights on
the Hugging Face hub), another torchvision weights name, or a local state_dict file; `none` trains from
random initialisation.

Library weights are fetched by the libraries' own download-and-cache code (torch hub's checkpoints
folder, the Hugging Face cache), once, with a progress bar. Offline (`VISIONSERVE_OFFLINE=1`, or the
hub's own `HF_HUB_OFFLINE=1`) nothing is tried on the network. A file that is not cached or a download
that fails stops training before it starts, naming the file to put where (or `weights=none`): there
is never a silent fallback to random weights. The head (`Architecture.head`) is always made anew for
the dataset's labels; the number of classes and the input normalisation come from the weights' metadata.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from models.tasks.architectures import Architecture
from models.values import to_flag

log = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("VISIONSERVE_OFFLINE", "HF_HUB_OFFLINE")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for, in its order


class WeightsError(ValueError):
    pass


def offline() -> bool:
    """Whether weights may only come from the caches (no network attempt)."""
    for name in OFFLINE_VARIABLES:
        try:
            if to_flag(os.environ.get(name) or "0"):
                return True
        except ValueError:
            raise WeightsError(f"{name}={os.environ[name]!r}: expected 0 or 1") from None
    return False


@dataclass(frozen=True)
class Source:
    """Where a model's starting weights come from, and what their metadata says."""

    kind: Literal["file", "torchvision", "timm"]
    name: str  # the file, "ResNet18_Weights.IMAGENET1K_V1" or "timm/resnest50d.in1k"
    prefix: str = ""  # where its tensors go in the model ("backbone.body." for backbone weights)
    num_classes: int | None = None  # of the weights' own head
    mean: tuple[float, float, float] | None = None  # the input normalisation they were trained with
    std: tuple[float, float, float] | None = None
    url: str | None = None
    cache: Path | None = None  # the file torchvision downloads to; the hub's cache folder for timm

    def missing(self, reason: str) -> WeightsError:
        """The one message for weights that are not here: what to put where, or weights=none."""
        if self.kind == "timm":
            where = (f"on a machine with network run `hf download {self.name} model.safetensors` and copy the "
                     f"folder {self.cache.name} from that machine's Hugging Face cache to {self.cache}")
        else:
            where = f"download {self.url} and put it at {self.cache}"
        return WeightsError(f"weights={self.name}: {reason}. To train from these pretrained weights, {where}; "
                            "to train from random initialisation instead, set weights=none")


@dataclass(frozen=True)
class LoadReport:
    source: str
    loaded: int
    skipped: tuple[str, ...]  # keys of the model left at their initial values
    head_classes: int | None = None  # classes of the weights' head that was replaced

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}; {len(self.skipped)} left initialised"
        if self.head_classes:
            text += f" (the head for {self.head_classes} classes is made anew for this dataset's labels)"
        return text


def _triple(values) -> tuple[float, float, float] | None:
    return tuple(float(v) for v in values) if values is not None and len(values) == 3 else None


def _torchvision_source(name: str, arch: Architecture) -> Source:
    """`DEFAULT`, `IMAGENET1K_V1` or `ResNet18_Weights.IMAGENET1K_V1` for a torchvision-built architecture."""
    candidates: list[tuple[str, str]] = []
    if "." in name:
        enum = name.split(".", 1)[0]
        prefix = arch.backbone_prefix if enum == (arch.backbone_weights or "").split(".")[0] else ""
        candidates.append((name, prefix))
    else:
        if arch.weights:
            candidates.append((f"{arch.weights.split('.')[0]}.{name}", ""))
        if arch.backbone_weights:
            candidates.append((f"{arch.backbone_weights.split('.')[0]}.{name}", arch.backbone_prefix))
    for full, prefix in candidates:
        try:
            weights = torchvision.models.get_weight(full)
        except (ValueError, KeyError, AttributeError):
            continue
        preset = weights.transforms()
        return Source("torchvision", f"{type(weights).__name__}.{weights.name}", prefix,
                      num_classes=len(weights.meta.get("categories") or []) or None,
                      mean=_triple(getattr(preset, "mean", None)), std=_triple(getattr(preset, "std", None)),
                      url=weights.url, cache=cached_file(weights))
    options = [w for w in (arch.weights, arch.backbone_weights) if w]
    raise WeightsError(f"weights={name} is not a torchvision weights name for {arch.name}"
                       + (f" (try {' or '.join(options)} or DEFAULT)" if options else ""))


def _timm_source(name: str, arch: Architecture) -> Source:
    """timm's pretrained weights of the architecture: `DEFAULT`, a tag (`gluon_in1k`) or `model.tag`."""
    import timm.models
    from huggingface_hub import constants

    base = arch.timm_weights.split(".")[0]
    full = arch.timm_weights if name == "DEFAULT" else name.removeprefix("timm/")
    if "." not in full:
        full = f"{base}.{full}"
    known = timm.models.get_arch_pretrained_cfgs(base)
    if full not in known:
        raise WeightsError(f"weights={name} is not a pretrained tag of {arch.name} (timm's {base}); "
                           f"use DEFAULT ({arch.timm_weights}) or one of: {', '.join(known)}")
    cfg = timm.models.get_pretrained_cfg(full)
    repo = cfg.hf_hub_id or f"timm/{full}"
    return Source("timm", repo, num_classes=cfg.num_classes, mean=_triple(cfg.mean), std=_triple(cfg.std),
                  url=f"https://huggingface.co/{repo}/resolve/main/model.safetensors",
                  cache=Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}")


def resolve(arch: Architecture, weights: str | None) -> Source | None:
    """Where `weights` (the setting) come from for `arch`; None: random initialisation. Reads no weights."""
    if weights is None or weights.strip().lower() in {"none", "null", ""}:
        return None
    path = Path(weights).expanduser()
    if path.suffix in _FILE_SUFFIXES or path.exists() or os.sep in weights and not weights.startswith("timm/"):
        return Source("file", str(path), cache=path)
    if arch.timm_weights and (arch.timm or not arch.weights or weights.startswith("timm/")):
        return _timm_source(weights, arch)
    if arch.timm:
        raise WeightsError(f"weights={weights}: {arch.name} has no pretrained weights; "
                           "pass a local state_dict file instead (weights=/path/to/file.pth) or weights=none")
    return _torchvision_source(weights, arch)


def cached_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torch keeps the file of these weights once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _state_dict(obj, where: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights={where}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _state_dict(load_file(str(path), device="cpu"), where)
        return _state_dict(torch.load(path, map_location="cpu", weights_only=True), where)
    except WeightsError:
        raise
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise WeightsError(f"weights={where}: not a readable torch state_dict ({exc})") from None


def _download_torchvision(source: Source, progress: bool) -> Path:
    if source.cache.exists():
        return source.cache
    if offline():
        raise source.missing(f"not in the torch cache and {'/'.join(OFFLINE_VARIABLES)} forbids downloading")
    log.info("downloading %s from %s to %s", source.name, source.url, source.cache)
    source.cache.parent.mkdir(parents=True, exist_ok=True)
    found = torch.hub.HASH_REGEX.search(source.cache.name)
    try:  # torch hub's own download: a temporary file, the hash checked, then renamed into place
        torch.hub.download_url_to_file(source.url, str(source.cache), found.group(1) if found else None,
                                       progress=progress)
    except Exception as exc:  # URLError, HTTPError, a hash mismatch, a full disk
        raise source.missing(f"the download failed ({type(exc).__name__}: {exc})") from None
    return source.cache


def _download_timm(source: Source) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    local_only, reasons = offline(), []
    for filename in _HUB_FILES:
        try:  # the hub's own cache and download (with its progress bar and retries)
            return Path(hf_hub_download(source.name, filename, local_files_only=local_only))
        except Exception as exc:  # not cached (offline), not in the repository, no network
            reasons.append(f"{filename}: {type(exc).__name__}")
            not_in_repository = isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError)
            if not (local_only or not_in_repository):
                break  # the hub is unreachable: the next file would only wait through the same retries
    why = ("not in the Hugging Face cache and " + "/".join(OFFLINE_VARIABLES) + " forbids downloading"
           if local_only else f"the download failed ({'; '.join(reasons)})")
    raise source.missing(why)


def available(source: Source, progress: bool = True) -> Path:
    """The local file of `source`, downloaded into the library's cache first if needed (or a WeightsError
    saying what to put where). Training calls this before it reads any image."""
    if source.kind == "file":
        if not source.cache.exists():
            raise WeightsError(f"weights={source.name}: file not found")
        return source.cache
    if source.kind == "torchvision":
        return _download_torchvision(source, progress)
    return _download_timm(source)


def fetch(source: Source, progress: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict of `source` (see `available`)."""
    return _read(available(source, progress), source.name)


def timm_vit_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's VisionTransformer names → torchvision's (the same network: pre-norm blocks, fused qkv, GELU MLP)."""
    top = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "norm.weight": "encoder.ln.weight",
           "norm.bias": "encoder.ln.bias", "head.weight": "heads.head.weight", "head.bias": "heads.head.bias",
           "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias"}
    block = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            for old, new in block.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[f"encoder.layers.encoder_layer_{index}.{rest}"] = value
    return out


def _fit_position_embedding(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """A ViT trained at another input size: its position embedding resampled to this model's grid."""
    key = "encoder.pos_embedding"
    if key in state and key in own and state[key].shape != own[key].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        side = math.isqrt(own[key].shape[1] - 1) * 16
        state.update(interpolate_embeddings(side, 16, {key: state[key]}))


def _match(model: nn.Module, state: dict[str, torch.Tensor], source: Source,
           arch: Architecture) -> tuple[dict, tuple[str, ...]]:
    own = model.state_dict()
    if source.prefix:
        state = {source.prefix + k: v for k, v in state.items()}
    elif not any(k in own for k in state):
        # a plain ResNet checkpoint given for a detector: it belongs under backbone.body.
        body = {"backbone.body." + k: v for k, v in state.items()}
        if any(k in own for k in body):
            state = body
    if source.kind != "file":  # library weights: their head is for their own classes
        state = {k: v for k, v in state.items() if not k.startswith(arch.head)}
    _fit_position_embedding(state, own)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = tuple(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    return usable, skipped


def load_weights(model: nn.Module, arch: Architecture, weights: str, progress: bool = True) -> LoadReport:
    """Load `weights` into `model` where names and shapes match; a new head stays initialised."""
    source = resolve(arch, weights)
    if source is None:
        raise WeightsError(f"weights={weights}: nothing to load (random initialisation)")
    state = fetch(source, progress)
    if source.kind == "timm" and not arch.timm:
        state = timm_vit_to_torchvision(state)
    usable, skipped = _match(model, state, source, arch)
    if not usable:
        raise WeightsError(f"weights={weights}: no tensor matches {arch.name} by name and shape")
    model.load_state_dict(usable, strict=False)
    report = LoadReport(source.name, len(usable), skipped, source.num_classes if source.kind != "file" else None)
    log.info("%s", report)
    return report
