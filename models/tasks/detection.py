"""Object detection and instance segmentation: transforms, dataset, loss, prediction, output.

Images reach the model as float RGB in [0, 1] (`eval_transform`); the torchvision detector
itself normalises and rescales to `min_size`/`max_size`, and maps boxes and masks back to the
original image, for validation and scoring alike.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from models.data.records import Box
from models.data.records import Record
from models.data.images import decode, image_size
from models.tasks.polygons import mask_to_polygons, polygons_to_mask
from models.tasks.tile_merge import merge_detections
from models.tasks.tiling import Tile, tile_grid

MIN_VISIBLE_FRACTION = 0.25  # a box cut by a training tile is kept if this much of it is inside

_TO_FLOAT = v2.ToDtype(torch.float32, scale=True)


def eval_transform(settings) -> Callable:
    """PIL image (and optional target) → float tensor in [0, 1]."""
    return v2.Compose([v2.ToImage(), _TO_FLOAT])


class _Augment:
    """The detection augmentations: expand, random crop around boxes, horizontal flip."""

    def __init__(self):
        self.with_boxes = v2.Compose([
            v2.ToImage(),
            v2.RandomApply([v2.RandomZoomOut(fill={tv_tensors.Image: (124, 116, 104), "others": 0},
                                             side_range=(1.0, 2.0))], p=0.5),
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(),
            v2.SanitizeBoundingBoxes(min_size=2),
            _TO_FLOAT,
        ])
        self.plain = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(), _TO_FLOAT])

    def __call__(self, image, target):
        if len(target["boxes"]) == 0:
            return self.plain(image, target)
        return self.with_boxes(image, target)


def train_transform(settings) -> Callable:
    if not settings.advanced_settings.apply_automl_train_augmentations:
        return eval_transform(settings)
    return _Augment()


def _crop(record_boxes: Sequence[Box], width: int, height: int, tile: Tile) -> list[tuple[Box, list[float]]]:
    """Boxes (in the pixels of the tile's crop) of the objects at least MIN_VISIBLE_FRACTION inside it."""
    left, top, right, bottom = tile.pixel_box()
    kept = []
    for b in record_boxes:
        x0, y0, x1, y1 = b.x0 * width, b.y0 * height, b.x1 * width, b.y1 * height
        cx0, cy0 = max(x0, left), max(y0, top)
        cx1, cy1 = min(x1, right), min(y1, bottom)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        if (cx1 - cx0) * (cy1 - cy0) < MIN_VISIBLE_FRACTION * (x1 - x0) * (y1 - y0):
            continue
        kept.append((b, [cx0 - left, cy0 - top, cx1 - left, cy1 - top]))
    return kept


def training_tiles(records: Sequence[Record], grid: tuple[int, int], overlap: float) -> list[tuple[Record, Tile]]:
    """Tiles of every image that contain at least one (non-crowd) annotation."""
    items = []
    for record in records:
        width, height = image_size(record.image)
        for tile in tile_grid(width, height, grid, overlap):
            if _crop([b for b in record.label if not b.is_crowd], width, height, tile):
                items.append((record, tile))
    return items


class DetectionDataset(torch.utils.data.Dataset):
    """(image tensor, target) with pixel `boxes`, `labels` (1..K), `iscrowd`, optional `masks`.

    Training (`drop_crowd=True`) leaves crowd objects out of the targets; validation keeps
    them flagged so the metric can ignore detections on them. `tiles` adds tile crops.
    """

    def __init__(self, records: Sequence[Record], labels: Sequence[str], transform: Callable, *,
                 masks: bool, drop_crowd: bool, tiles: Sequence[tuple[Record, Tile]] = ()):
        self.items: list[tuple[Record, Tile | None]] = [(r, None) for r in records] + list(tiles)
        self.index = {name: i + 1 for i, name in enumerate(labels)}
        self.transform = transform
        self.masks = masks
        self.drop_crowd = drop_crowd

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        record, tile = self.items[i]
        try:
            image = decode(record.image)
        except ValueError as exc:
            raise ValueError(f"{record.where}: {record.image}: {exc}") from None
        width, height = image.size
        objects = [b for b in record.label if not (self.drop_crowd and b.is_crowd)]
        if tile is None:
            boxes = [[b.x0 * width, b.y0 * height, b.x1 * width, b.y1 * height] for b in objects]
            pairs = list(zip(objects, boxes))
        else:
            pairs = _crop(objects, width, height, tile)
            image = image.crop(tile.pixel_box())
        target = self._target(pairs, image.size, width, height, tile)
        image, target = self.transform(image, target)
        return image, (_tight_boxes(target) if self.masks else target)

    def _target(self, pairs, size: tuple[int, int], width: int, height: int, tile: Tile | None) -> dict:
        canvas = (size[1], size[0])
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor([p[1] for p in pairs], dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=canvas),
            "labels": torch.tensor([self.index[b.label] for b, _ in pairs], dtype=torch.int64),
        }
        if not self.drop_crowd:
            target["iscrowd"] = torch.tensor([int(b.is_crowd) for b, _ in pairs], dtype=torch.int64)
        if self.masks:
            full = [polygons_to_mask(b.polygons, width, height) for b, _ in pairs]
            if tile is not None:
                x0, y0, x1, y1 = tile.pixel_box()
                full = [m[y0:y1, x0:x1] for m in full]
            stacked = np.stack(full) if full else np.zeros((0, *canvas), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        return target


def _tight_boxes(target: dict) -> dict:
    """Boxes of what is left of each mask after augmentation (a crop may cut an object)."""
    masks = target["masks"]
    keep = masks.flatten(1).bool().any(dim=1)
    boxes = masks_to_boxes(masks[keep]) if keep.any() else torch.zeros((0, 4))
    keep_idx = torch.nonzero(keep).flatten()
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    index = keep_idx[valid]
    out = {k: v[index] for k, v in target.items() if k not in ("boxes", "masks")}
    out["boxes"] = tv_tensors.BoundingBoxes(boxes[valid], format="XYXY", canvas_size=masks.shape[-2:])
    out["masks"] = tv_tensors.Mask(masks[index])
    return out


def collate(batch):
    return tuple(zip(*batch))


def loss(model: nn.Module, images: Sequence[torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
    return sum(model(list(images), list(targets)).values())


def model_scale(width: float, height: float, settings) -> float:
    """The factor torchvision's detector transform resizes a width x height input by (min_size, max_size)."""
    return min(settings.min_size / min(width, height), settings.max_size / max(width, height))


def configured(model: nn.Module, settings, proposal_share: float = 1.0) -> nn.Module:
    """A view of the torchvision detector `model` that scores under `settings` (sizes, thresholds, detections
    per image) and, for a tile holding `proposal_share` of the image, proportionally fewer region proposals (at
    least 100: the box head's cost grows with them). The view shares every weight with `model`, and nothing of
    `model` changes: views for different settings score side by side, without a lock."""
    view = _shallow(model)
    if hasattr(model, "transform"):  # any module answering torchvision's detector outputs scores (tests' too)
        transform = view.transform = _shallow(model.transform)
        transform.min_size, transform.max_size = (settings.min_size,), settings.max_size
    heads = view  # RetinaNet keeps its thresholds on itself
    if hasattr(model, "roi_heads"):
        heads = view.roi_heads = _shallow(model.roi_heads)
    heads.score_thresh = settings.box_score_thresh
    heads.nms_thresh = settings.nms_iou_thresh
    heads.detections_per_img = settings.box_detections_per_img
    if proposal_share < 1.0 and hasattr(model, "rpn"):
        rpn = view.rpn = _shallow(model.rpn)
        rpn._pre_nms_top_n = {**rpn._pre_nms_top_n, "testing": _share(rpn._pre_nms_top_n["testing"], proposal_share)}
        rpn._post_nms_top_n = {**rpn._post_nms_top_n,
                               "testing": _share(rpn._post_nms_top_n["testing"], proposal_share)}
    elif proposal_share < 1.0 and hasattr(model, "topk_candidates"):  # RetinaNet: candidates per pyramid level
        view.topk_candidates = _share(model.topk_candidates, proposal_share)
    return view


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of `module` whose attributes and child list are its own, its children and weights shared."""
    copied = copy.copy(module)
    copied.__dict__["_modules"] = dict(module._modules)  # copy.copy would share the child dict itself
    return copied


def _share(count: int, share: float) -> int:
    return max(100, int(count * share))


def predict(model: nn.Module, images: Sequence[torch.Tensor], settings) -> list[dict]:
    """Raw detections per image in its own pixel coordinates (torchvision's output dicts), under `settings`
    (`configured`: `model` itself is not changed).

    With `tile_grid_size` set, each image is scored as its tiles plus the whole image, and the detections are
    mapped back and merged (`models.tasks.tile_merge`). The tiles of all `images` (several requests' images, when
    the endpoint's batcher gave them together) are pooled: the tiles of images of one size go through together, a
    few per pass, and so do whole images of one size.
    """
    grid = getattr(settings, "tile_grid", None)
    if grid is None:
        return configured(model, settings)(list(images))
    tiled = [_tiles(image, grid, settings.tile_overlap_ratio) for image in images]
    inputs = [((share, image.shape), crop) for image, (crops, _, share) in zip(images, tiled) for crop in crops]
    inputs += [((1.0, image.shape), image) for image in images]
    outputs = _pooled(model, inputs, settings)
    wholes = outputs[len(inputs) - len(images):]
    answers, start = [], 0
    for (crops, offsets, _), whole in zip(tiled, wholes):
        answers.append(_merge_tiles(outputs[start:start + len(crops)] + [whole], offsets, settings))
        start += len(crops)
    return answers


def _tiles(image: torch.Tensor, grid: tuple[int, int], overlap: float) -> tuple[list[torch.Tensor], list, float]:
    """An image's tile crops (views), their offsets with the whole image's (0, 0) last, and the share of the
    image a tile holds."""
    height, width = image.shape[-2:]
    boxes = [t.pixel_box() for t in tile_grid(width, height, grid, overlap)]
    crops = [image[:, top:bottom, left:right] for left, top, right, bottom in boxes]
    offsets = [(left, top) for left, top, _, _ in boxes] + [(0, 0)]
    return crops, offsets, crops[0].shape[-1] * crops[0].shape[-2] / (width * height)


def _pooled(model: nn.Module, inputs: Sequence[tuple[tuple[float, torch.Size], torch.Tensor]], settings) -> list[dict]:
    """Detections of each input ((proposal share, its image's size), pixels), in order. Inputs of one key (the
    tiles of images of one size, or whole images of one size) go through together, `images_per_pass` at a time,
    through the view configured for their share: each is padded in its pass as it would be among its own image's
    tiles, so an image's answer does not depend on the images it came with."""
    groups: dict[tuple, list[int]] = {}
    for i, (key, _) in enumerate(inputs):
        groups.setdefault(key, []).append(i)
    outputs: list[dict | None] = [None] * len(inputs)
    step = settings.images_per_pass()
    for (share, _), indices in groups.items():
        view = configured(model, settings, proposal_share=share)
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            for i, out in zip(chunk, view([inputs[i][1] for i in chunk])):
                outputs[i] = out
    return outputs


def _merge_tiles(outputs: Sequence[dict], offsets: Sequence[tuple[int, int]], settings) -> dict:
    """One image's detections from those of its tiles and of the whole image (the last), in image pixels."""
    device = outputs[-1]["boxes"].device
    shift = torch.tensor([[x, y, x, y] for x, y in offsets], dtype=torch.float32, device=device)
    all_boxes = torch.cat([out["boxes"] + shift[i] for i, out in enumerate(outputs)])
    sources = torch.cat([torch.full((len(out["boxes"]),), i, dtype=torch.long, device=device)
                         for i, out in enumerate(outputs)])
    merged = merge_detections(all_boxes, torch.cat([o["scores"] for o in outputs]),
                              torch.cat([o["labels"] for o in outputs]), sources,
                              settings.tile_predictions_nms_thresh, getattr(settings, "tile_merge", "nms"))
    limit = settings.box_detections_per_img
    return {"boxes": merged["boxes"][:limit], "scores": merged["scores"][:limit], "labels": merged["labels"][:limit]}


def _mask_image(mask: np.ndarray, image_type: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="JPEG" if image_type == "JPG" else image_type)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def paste_masks_one_at_a_time(model: nn.Module) -> None:
    """Scoring: Mask R-CNN returns each detection's 28x28 mask probabilities (`mask_probs`) instead of
    pasting them all as full-size float masks at once (N x H x W floats: 0.5 GB for 100 detections on a
    1333 x 1000 image); `format_output` pastes them one at a time with torchvision's own paste."""
    transform = model.transform
    paste_all = transform.postprocess

    def postprocess(result, image_shapes, original_image_sizes):
        for prediction in result:
            if "masks" in prediction:
                prediction["mask_probs"] = prediction.pop("masks")
        return paste_all(result, image_shapes, original_image_sizes)

    transform.postprocess = postprocess


def _binary_masks(prediction: dict, width: int, height: int, threshold: float) -> Iterator[np.ndarray | None]:
    """Each detection's mask over the whole image, thresholded, one at a time (None: no masks)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    if "mask_probs" in prediction:
        probs, boxes = prediction["mask_probs"], prediction["boxes"]
        for i in range(len(boxes)):
            pasted = paste_masks_in_image(probs[i:i + 1].float(), boxes[i:i + 1].float(), (height, width))
            yield (pasted[0, 0] > threshold).cpu().numpy()
    elif "masks" in prediction:
        for mask in prediction["masks"]:
            yield (mask[0] > threshold).cpu().numpy()
    else:
        while True:
            yield None


def format_output(prediction: dict, width: int, height: int, labels: Sequence[str], settings) -> dict:
    """scoring.md's response: boxes as fractions of the image, label and score (+ polygons)."""
    boxes = prediction["boxes"].detach().float().cpu()
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    normalised = (boxes / scale).clamp_(0.0, 1.0).tolist()
    scores = prediction["scores"].detach().float().cpu().tolist()
    classes = prediction["labels"].detach().cpu().tolist()
    threshold = getattr(settings, "mask_pixel_score_threshold", 0.5)
    out = []
    for box, score, cls, binary in zip(normalised, scores, classes, _binary_masks(prediction, width, height,
                                                                                  threshold)):
        item = {
            "box": {"topX": box[0], "topY": box[1], "bottomX": box[2], "bottomY": box[3]},
            "label": labels[cls - 1],
            "score": score,
        }
        if binary is not None:
            item["polygon"] = mask_to_polygons(binary, settings.max_number_of_polygon_points)
            if settings.export_as_image:
                item["mask"] = _mask_image(binary, settings.image_type)
        out.append(item)
    return {"boxes": out}
