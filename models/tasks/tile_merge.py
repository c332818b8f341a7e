"""Merging detections from tiles and the whole image (inference.md, "Tiling").

`nms` (default, the cloud's semantics): greedy by score; a box suppresses another only when both
have the same label, come from different tiles (the whole image counts as one tile) and their IoU
exceeds the threshold. Boxes of one tile never suppress each other (the detector's own NMS has
already run there).

`greedy_nmm` (greedy non-maximum merging, as SAHI's GREEDYNMM with intersection-over-smaller):
an object cut by a tile border leaves a partial box that IoU rarely links to the whole one, so
boxes of the same label whose intersection over the smaller box exceeds the threshold are merged
into their union, keeping the highest score. The IoU/IoS work is torchvision.ops'.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.ops import box_area, box_iou

MergeMode = Literal["nms", "greedy_nmm"]
MAX_CANDIDATES = 3000  # boxes the merge considers, highest scores first: its pairwise matrix stays at 3000²


def _intersection_over_smaller(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection divided by the smaller area, via torchvision's IoU and areas."""
    area = box_area(boxes)
    iou = box_iou(boxes, boxes)
    # iou = inter / (a + b - inter)  =>  inter = iou * (a + b) / (1 + iou)
    total = area[:, None] + area[None, :]
    inter = iou * total / (1.0 + iou)
    smaller = torch.minimum(area[:, None], area[None, :]).clamp(min=1e-9)
    return inter / smaller


def _candidates(boxes: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, threshold: float,
                mode: MergeMode) -> torch.Tensor:
    """[N, N] bool: pairs that the merge may join (same label, different source, overlap over threshold)."""
    overlap = box_iou(boxes, boxes) if mode == "nms" else _intersection_over_smaller(boxes)
    same_label = labels[:, None] == labels[None, :]
    other_source = sources[:, None] != sources[None, :]
    return (overlap > threshold) & same_label & other_source


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor,
                     threshold: float, mode: MergeMode = "nms") -> dict[str, torch.Tensor]:
    """Merge detections of several tiles of one image (boxes already in image coordinates).

    `sources` names the tile each box came from (any integers; the whole image is one of them).
    Returns `boxes`, `scores`, `labels` sorted by score, plus `index` (the kept/leading boxes), on
    the CPU: a few hundred boxes are merged faster there than with a GPU sync per step. Only the
    MAX_CANDIDATES highest-scoring boxes are considered (at most box_detections_per_img are kept anyway).
    """
    boxes, scores, labels, sources = (t.detach().cpu() for t in (boxes, scores, labels, sources))
    if boxes.numel() == 0:
        return {"boxes": boxes.reshape(0, 4), "scores": scores, "labels": labels,
                "index": torch.zeros(0, dtype=torch.long)}
    order = torch.argsort(scores, descending=True)[:MAX_CANDIDATES]
    boxes, scores, labels, sources = boxes[order], scores[order], labels[order], sources[order]
    linked = _candidates(boxes, labels, sources, threshold, mode)
    alive = torch.ones(len(boxes), dtype=torch.bool)
    kept: list[int] = []
    merged: list[torch.Tensor] = []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        kept.append(i)
        group = linked[i] & alive
        group[:i + 1] = False
        box = boxes[i]
        if mode == "greedy_nmm" and group.any():
            members = boxes[group]
            box = torch.cat([torch.minimum(box[:2], members[:, :2].min(0).values),
                             torch.maximum(box[2:], members[:, 2:].max(0).values)])
        merged.append(box)
        alive &= ~group
    index = order[torch.tensor(kept, dtype=torch.long)]
    keep = torch.tensor(kept, dtype=torch.long)
    return {"boxes": torch.stack(merged), "scores": scores[keep], "labels": labels[keep], "index": index}
