"""Tests for models/weights.py: local state_dict files, torchvision weights names read from the
torch cache only (never downloaded), and the errors for everything else."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from models.tasks.architectures import Architecture, build_model
from models.tasks.registry import get_task, training_settings
from models.train.weights import WeightsError, cached_file, load_weights

NUM_CLASSES = 3
FAMILY_TASK = {"classification": "image_classification", "detection": "image_object_detection",
               "segmentation": "image_instance_segmentation"}


def make(name: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> tuple[nn.Module, Architecture]:
    """A freshly initialised visionserve model (small input sizes; they do not change tensor shapes)."""
    family = ("detection" if name.startswith(("fasterrcnn", "retinanet"))
              else "segmentation" if name.startswith("maskrcnn") else "classification")
    raw = {"model_name": name}
    if family == "classification":
        raw |= {"valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64}
    else:
        raw |= {"min_size": 64, "max_size": 96}
    settings, arch = training_settings(get_task(FAMILY_TASK[family]), raw)
    torch.manual_seed(seed)
    return build_model(arch, num_classes, settings), arch


def plain_resnet18(seed: int = 1) -> nn.Module:
    """torchvision's resnet18 as a pretrained file would hold it: 1000 ImageNet classes."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache in tmp_path (the real one is never read), and any download attempt
    or network connection fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir

    def no_download(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_download)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) / "checkpoints" == checkpoints
    return checkpoints


def put_in_cache(weights_name: str, state: dict[str, torch.Tensor]) -> Path:
    """Save `state` at the exact path torch would have downloaded `weights_name` to."""
    path = cached_file(torchvision.models.get_weight(weights_name))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# ---------------------------------------------------------------- local files


def test_local_state_dict_loads_backbone_and_leaves_mismatched_head_initialised(tmp_path: Path) -> None:
    source = plain_resnet18()
    file = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), file)
    model, arch = make("resnet18")
    fc_before = snapshot(model.fc)

    report = load_weights(model, arch, str(file))

    after, pretrained = model.state_dict(), source.state_dict()
    backbone = [k for k in after if not k.startswith("fc.")]
    assert backbone and all(torch.equal(after[k], pretrained[k]) for k in backbone)
    assert model.fc.weight.shape == (NUM_CLASSES, 512)
    assert all(torch.equal(v, snapshot(model.fc)[k]) for k, v in fc_before.items())
    assert report.source == str(file)
    assert report.skipped == ("fc.weight", "fc.bias")
    assert report.loaded == len(pretrained) - 2
    assert f"loaded {report.loaded} tensors" in str(report) and "2 left initialised" in str(report)


def test_local_file_may_wrap_the_state_dict_and_carry_dataparallel_prefixes(tmp_path: Path) -> None:
    source = plain_resnet18()
    file = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, file)
    model, arch = make("resnet18")
    report = load_weights(model, arch, str(file))
    assert report.loaded == len(source.state_dict()) - 2
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_a_visionserve_checkpoint_file_loads_as_weights(tmp_path: Path) -> None:
    from models.train.checkpoints import save_checkpoint

    trained, arch = make("resnet18", seed=5)
    file = save_checkpoint(tmp_path / "ckpt.pt", model=trained, task="image_classification", model_name="resnet18",
                           labels=["a", "b", "c"], settings={}, epoch=1, metrics={})
    model, _ = make("resnet18", seed=6)
    report = load_weights(model, arch, str(file))
    assert report.skipped == ()  # same classes: the head loads too
    assert torch.equal(model.fc.weight, trained.fc.weight)


def test_plain_resnet_state_dict_lands_under_the_detector_backbone_body(tmp_path: Path) -> None:
    source = plain_resnet18()
    file = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), file)
    model, arch = make("fasterrcnn_resnet18_fpn")
    heads_before = snapshot(model.roi_heads)

    report = load_weights(model, arch, str(file))

    body = model.backbone.body
    assert torch.equal(body.conv1.weight, source.conv1.weight)
    assert torch.equal(body.layer3[0].downsample[0].weight, source.layer3[0].downsample[0].weight)
    assert torch.equal(body.bn1.running_var, source.bn1.running_var)  # FrozenBatchNorm2d buffers too
    assert all(torch.equal(v, model.roi_heads.state_dict()[k]) for k, v in heads_before.items())
    assert all(not k.startswith("backbone.body.") for k in report.skipped)
    assert any(k.startswith("rpn.") for k in report.skipped)


def test_timm_architecture_loads_a_local_file(tmp_path: Path) -> None:
    source, arch = make("resnest50", num_classes=10, seed=2)
    file = tmp_path / "resnest50.pth"
    torch.save(source.state_dict(), file)
    model, _ = make("resnest50", seed=3)
    report = load_weights(model, arch, str(file))
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)


def test_missing_local_file_is_a_clear_error(tmp_path: Path) -> None:
    model, arch = make("resnet18")
    with pytest.raises(WeightsError, match="file not found"):
        load_weights(model, arch, str(tmp_path / "nope.pth"))


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "corrupt.pth"
    file.write_bytes(b"this is not a torch file" * 10)
    model, arch = make("resnet18")
    with pytest.raises(WeightsError, match=r"corrupt\.pth: not a readable torch state_dict"):
        load_weights(model, arch, str(file))


def test_file_that_is_not_a_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], file)
    model, arch = make("resnet18")
    with pytest.raises(WeightsError, match="expected a state_dict"):
        load_weights(model, arch, str(file))


def test_file_with_no_matching_tensor_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4), "conv1.weight": torch.zeros(1)}, file)  # wrong name, wrong shape
    model, arch = make("resnet18")
    before = snapshot(model)
    with pytest.raises(WeightsError, match="no tensor matches resnet18 by name and shape"):
        load_weights(model, arch, str(file))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- torchvision names, cache only


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_weights_name_not_in_cache_names_the_path_and_downloads_nothing(torch_cache: Path, name: str) -> None:
    model, arch = make("resnet18")
    expected = torch_cache / "resnet18-f37072fd.pth"
    with pytest.raises(WeightsError) as err:
        load_weights(model, arch, name)
    message = str(err.value)
    assert str(expected) in message
    assert "does not download" in message and "ResNet18_Weights.IMAGENET1K_V1" in message
    assert not torch_cache.exists()  # nothing was written either


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_weights_name_loads_from_the_cache_file(torch_cache: Path, name: str) -> None:
    source = plain_resnet18()
    path = put_in_cache("ResNet18_Weights.IMAGENET1K_V1", source.state_dict())
    assert path.parent == torch_cache
    model, arch = make("resnet18")
    report = load_weights(model, arch, name)
    assert report.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert report.skipped == ("fc.weight", "fc.bias")
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


@pytest.mark.parametrize(("name", "weights_name", "file_name"), [
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights.COCO_V1", "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    ("fasterrcnn_resnet18_fpn", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("maskrcnn_resnet50_fpn", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    ("maskrcnn_resnet101_fpn", "ResNet101_Weights.IMAGENET1K_V2", "resnet101-cd907fc2.pth"),
    ("retinanet_resnet50_fpn", "RetinaNet_ResNet50_FPN_Weights.COCO_V1", "retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    ("mobilenetv2", "MobileNet_V2_Weights.IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth"),
    ("vitb16r224", "ViT_B_16_Weights.IMAGENET1K_V1", "vit_b_16-c867db91.pth"),
])
def test_default_resolves_to_the_architecture_weights(torch_cache: Path, name: str, weights_name: str,
                                                     file_name: str) -> None:
    assert cached_file(torchvision.models.get_weight(weights_name)).name == file_name
    with torch.device("meta"):
        model, arch = make(name)
    with pytest.raises(WeightsError, match=rf"{weights_name} is not in the torch cache \(.*{file_name}\)"):
        load_weights(model, arch, "DEFAULT")


def test_default_for_fasterrcnn_resnet50_loads_the_whole_coco_model(torch_cache: Path) -> None:
    coco, _ = make("fasterrcnn_resnet50_fpn", num_classes=90, seed=4)  # 91 outputs, as torchvision's file
    put_in_cache("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", coco.state_dict())
    model, arch = make("fasterrcnn_resnet50_fpn", seed=5)
    predictor_before = snapshot(model.roi_heads.box_predictor)

    report = load_weights(model, arch, "DEFAULT")

    assert report.source == "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert set(report.skipped) == {f"roi_heads.box_predictor.{k}" for k in predictor_before}
    for module in ("backbone.body.layer4.2.conv3.weight", "backbone.fpn.inner_blocks.0.0.weight",
                   "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight"):
        assert torch.equal(model.state_dict()[module], coco.state_dict()[module]), module
    assert all(torch.equal(v, model.roi_heads.box_predictor.state_dict()[k]) for k, v in predictor_before.items())


def test_default_for_fasterrcnn_resnet18_loads_backbone_weights_only(torch_cache: Path) -> None:
    source = plain_resnet18()
    put_in_cache("ResNet18_Weights.IMAGENET1K_V1", source.state_dict())
    model, arch = make("fasterrcnn_resnet18_fpn")
    fpn_before = snapshot(model.backbone.fpn)

    report = load_weights(model, arch, "DEFAULT")

    assert report.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert report.loaded == len([k for k in source.state_dict() if not k.startswith("fc.")
                                 and not k.endswith("num_batches_tracked")])
    assert all(k.startswith(("backbone.fpn.", "rpn.", "roi_heads.")) for k in report.skipped)
    assert all(torch.equal(v, model.backbone.fpn.state_dict()[k]) for k, v in fpn_before.items())


def test_imagenet_name_for_fasterrcnn_resnet50_falls_back_to_backbone_weights(torch_cache: Path) -> None:
    with torch.device("meta"):
        model, arch = make("fasterrcnn_resnet50_fpn")
    with pytest.raises(WeightsError, match=r"ResNet50_Weights.IMAGENET1K_V2 is not in the torch cache"):
        load_weights(model, arch, "IMAGENET1K_V2")


def test_unknown_weights_name_lists_the_choices(torch_cache: Path) -> None:
    with torch.device("meta"):
        model, arch = make("resnet18")
    with pytest.raises(WeightsError, match=r"weights=COCO_V9 is not a torchvision weights name for resnet18 "
                                           r"\(try ResNet18_Weights.DEFAULT or DEFAULT\)"):
        load_weights(model, arch, "COCO_V9")


@pytest.mark.parametrize("name", ["seresnext", "resnest50", "resnest101"])
@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1"])
def test_timm_architecture_with_a_weights_name_asks_for_a_local_file(torch_cache: Path, name: str,
                                                                      weights: str) -> None:
    with torch.device("meta"):
        model, arch = make(name)
    assert arch.timm
    with pytest.raises(WeightsError, match=rf"{name} is built by timm.*pass a local state_dict file"):
        load_weights(model, arch, weights)
