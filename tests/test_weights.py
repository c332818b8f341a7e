"""Tests for models/train/weights.py: pretrained weights by default from the libraries' caches (filled
here with random values of the right names and shapes), downloads refused or forbidden offline with the
file to put where, heads made anew, local state_dict files, and the errors for everything else."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from models.tasks.architectures import Architecture, build_model, get_architecture, names
from models.tasks.registry import get_task, training_settings
from models.train.weights import WeightsError, load_weights, resolve
from weights_cache import put_timm, put_torchvision

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
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch and Hugging Face caches in tmp_path (the session's are not read), offline: any
    network connection fails the test. Returns torch's checkpoints folder."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # read by the hub at each call
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("VISIONSERVE_OFFLINE", "1")

    def no_network(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(f"a network connection was attempted: {args[1:2]}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) / "checkpoints" == checkpoints
    return checkpoints


@pytest.fixture
def refused_network(caches: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The empty caches, online, with every download refused at once (a proxy on a port nothing listens on)."""
    from models.runtime import free_port

    monkeypatch.undo()  # the guard against connections goes: this test makes one
    monkeypatch.setenv("TORCH_HOME", str(caches.parent.parent))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(caches.parent.parent.parent / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("VISIONSERVE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return caches


def put_in_cache(weights_name: str, state: dict[str, torch.Tensor]) -> Path:
    """Save `state` at the exact path torch would have downloaded `weights_name` to."""
    return put_torchvision(weights_name, state)


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


# ---------------------------------------------------------------- pretrained by default, from the caches


def test_pretrained_weights_are_the_default_and_none_means_random_initialisation() -> None:
    settings, arch = training_settings(get_task("image_classification"), {"model_name": "resnet18"})
    assert settings.weights == "DEFAULT" and resolve(arch, settings.weights).name == "ResNet18_Weights.IMAGENET1K_V1"
    for spelled in ("none", "None", "null"):
        scratch, _ = training_settings(get_task("image_classification"), {"model_name": "resnet18", "weights": spelled})
        assert scratch.weights is None and resolve(arch, scratch.weights) is None


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_offline_without_the_file_names_the_path_the_url_and_weights_none(caches: Path, name: str) -> None:
    model, arch = make("resnet18")
    with pytest.raises(WeightsError) as err:
        load_weights(model, arch, name)
    message = str(err.value)
    assert str(caches / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "VISIONSERVE_OFFLINE" in message and "weights=none" in message
    assert not caches.exists()  # nothing was written either


def test_offline_timm_weights_name_the_hub_folder_and_the_download_command(caches: Path) -> None:
    with torch.device("meta"):
        model, arch = make("resnest50")
    with pytest.raises(WeightsError) as err:
        load_weights(model, arch, "DEFAULT")
    message = str(err.value)
    assert "hf download timm/resnest50d.in1k model.safetensors" in message
    assert str(caches.parent.parent.parent / "hf" / "models--timm--resnest50d.in1k") in message
    assert "weights=none" in message


def test_a_refused_download_stops_with_the_file_to_put_where(refused_network: Path) -> None:
    model, arch = make("resnet18")
    with pytest.raises(WeightsError) as err:
        load_weights(model, arch, "DEFAULT")
    message = str(err.value)
    assert "the download failed" in message and "URLError" in message
    assert str(refused_network / "resnet18-f37072fd.pth") in message and "weights=none" in message
    assert not (refused_network / "resnet18-f37072fd.pth").exists()


@pytest.mark.slow  # the hub retries a refused connection for about 25 s before it gives up
def test_a_refused_hub_download_stops_with_the_folder_to_put_where(refused_network: Path) -> None:
    with torch.device("meta"):
        model, arch = make("seresnext")
    with pytest.raises(WeightsError, match=r"the download failed.*hf download timm/seresnext50_32x4d.racm_in1k"):
        load_weights(model, arch, "DEFAULT")


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_weights_name_loads_from_the_cache_file(caches: Path, name: str) -> None:
    source = plain_resnet18()
    path = put_in_cache("ResNet18_Weights.IMAGENET1K_V1", source.state_dict())
    assert path.parent == caches
    model, arch = make("resnet18")
    report = load_weights(model, arch, name)
    assert report.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert report.skipped == ("fc.weight", "fc.bias")
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_the_head_is_made_anew_even_for_as_many_classes_as_imagenet(caches: Path) -> None:
    source = plain_resnet18()
    put_in_cache("ResNet18_Weights.IMAGENET1K_V1", source.state_dict())
    model, arch = make("resnet18", num_classes=1000)  # the same shape as ImageNet's head, other classes
    fc_before = snapshot(model.fc)
    report = load_weights(model, arch, "DEFAULT")
    assert report.skipped == ("fc.weight", "fc.bias") and report.head_classes == 1000
    assert "the head for 1000 classes is made anew" in str(report)
    assert all(torch.equal(v, model.fc.state_dict()[k]) for k, v in fc_before.items())
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def _family(name: str) -> str:
    return ("detection" if name.startswith(("fasterrcnn", "retinanet"))
            else "segmentation" if name.startswith("maskrcnn") else "classification")


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("name", names())
def test_every_architecture_loads_its_pretrained_weights_from_a_filled_cache(caches: Path, name: str) -> None:
    """Files of the libraries' names and shapes (one value per tensor, so even ViT-L is a few KB): everything
    but the head loads, for backbone-only weights everything of the backbone, and the head is left alone."""
    arch = get_architecture(name, _family(name))
    source = resolve(arch, "DEFAULT")
    assert source is not None, f"{name} has no pretrained weights (list it in the README if so)"
    if source.kind == "timm":
        put_timm(source.name, compact=True)
    else:
        put_torchvision(source.name, compact=True)
    with torch.device("meta"):
        model, _ = make(name)
    report = load_weights(model, arch, "DEFAULT")
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    head = [k for k in own if k.startswith(arch.head)]
    assert head and set(head) <= set(report.skipped), "the head must be made for the dataset's labels"
    if source.prefix:  # backbone weights: the whole backbone body loads
        assert all(not k.startswith(source.prefix) for k in report.skipped)
    else:
        assert set(report.skipped) == set(head), set(report.skipped) - set(head)
    assert report.loaded == len([k for k in model.state_dict() if k not in report.skipped])


def test_vit_s16_takes_timms_weights_and_computes_what_timm_computes(caches: Path) -> None:
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    put_timm("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", reference.state_dict())
    settings, arch = training_settings(get_task("image_classification"), {"model_name": "vits16r224"})
    model = build_model(arch, NUM_CLASSES, settings).eval()
    report = load_weights(model, arch, "DEFAULT")
    assert set(report.skipped) == {"heads.head.weight", "heads.head.bias"}
    model.heads = nn.Identity()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
        assert torch.allclose(model(pixels), expected, atol=1e-4)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_a_vit_at_another_input_size_gets_its_position_embedding_resampled(caches: Path) -> None:
    put_torchvision("ViT_B_16_Weights.IMAGENET1K_V1", compact=True)  # 14 x 14 patches + the class token
    with torch.device("meta"):
        model, arch = make("vitb16r224")  # 64 px: 4 x 4 patches
    report = load_weights(model, arch, "DEFAULT")
    assert "encoder.pos_embedding" not in report.skipped
    assert model.encoder.pos_embedding.shape == (1, 17, 768)


def test_default_for_fasterrcnn_resnet50_loads_the_whole_coco_model(caches: Path) -> None:
    coco, _ = make("fasterrcnn_resnet50_fpn", num_classes=90, seed=4)  # 91 outputs, as torchvision's file
    put_in_cache("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", coco.state_dict())
    model, arch = make("fasterrcnn_resnet50_fpn", seed=5)
    predictor_before = snapshot(model.roi_heads.box_predictor)

    report = load_weights(model, arch, "DEFAULT")

    assert report.source == "FasterRCNN_ResNet50_FPN_Weights.COCO_V1" and report.head_classes == 91
    assert set(report.skipped) == {f"roi_heads.box_predictor.{k}" for k in predictor_before}
    for module in ("backbone.body.layer4.2.conv3.weight", "backbone.fpn.inner_blocks.0.0.weight",
                   "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight"):
        assert torch.equal(model.state_dict()[module], coco.state_dict()[module]), module
    assert all(torch.equal(v, model.roi_heads.box_predictor.state_dict()[k]) for k, v in predictor_before.items())


def test_default_for_fasterrcnn_resnet18_loads_backbone_weights_only(caches: Path) -> None:
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


def test_imagenet_name_for_fasterrcnn_resnet50_falls_back_to_backbone_weights(caches: Path) -> None:
    with torch.device("meta"):
        model, arch = make("fasterrcnn_resnet50_fpn")
    with pytest.raises(WeightsError, match=r"ResNet50_Weights.IMAGENET1K_V2: not in the torch cache"):
        load_weights(model, arch, "IMAGENET1K_V2")


def test_unknown_weights_name_lists_the_choices(caches: Path) -> None:
    with torch.device("meta"):
        model, arch = make("resnet18")
    with pytest.raises(WeightsError, match=r"weights=COCO_V9 is not a torchvision weights name for resnet18 "
                                           r"\(try ResNet18_Weights.DEFAULT or DEFAULT\)"):
        load_weights(model, arch, "COCO_V9")


def test_timm_architecture_takes_a_pretrained_tag_and_lists_them_otherwise(caches: Path) -> None:
    arch = get_architecture("seresnext", "classification")
    assert resolve(arch, "gluon_in1k").name == "timm/seresnext50_32x4d.gluon_in1k"
    assert resolve(arch, "seresnext50_32x4d.gluon_in1k").name == "timm/seresnext50_32x4d.gluon_in1k"
    with pytest.raises(WeightsError, match=r"weights=IMAGENET1K_V1 is not a pretrained tag of seresnext.*racm_in1k"):
        resolve(arch, "IMAGENET1K_V1")


def test_offline_can_be_said_with_the_hubs_own_variable(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISIONSERVE_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, arch = make("resnet18")
    with pytest.raises(WeightsError, match="forbids downloading"):
        load_weights(model, arch, "DEFAULT")
    monkeypatch.setenv("VISIONSERVE_OFFLINE", "maybe")
    with pytest.raises(WeightsError, match=r"VISIONSERVE_OFFLINE='maybe': expected 0 or 1"):
        load_weights(model, arch, "DEFAULT")
