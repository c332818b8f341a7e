"""The spec's 2x2 explanation picture as a base64 PNG (matplotlib's Agg backend, colorcet's bgyw)."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

TOP_FRACTION = 0.3


def heat(attributions: torch.Tensor) -> np.ndarray:
    """[3, S, S] attributions → [S, S] in [0, 1]: summed |attribution| per pixel, scaled by its 99.5th
    percentile (1 = most contribution)."""
    magnitude = attributions.abs().sum(0).numpy().astype(np.float64)
    top = np.percentile(magnitude, 99.5)
    if not np.isfinite(top) or top <= 0:
        top = magnitude.max()
    return np.clip(magnitude / top, 0, 1) if top > 0 else np.zeros_like(magnitude)


def top_pixels(image: np.ndarray, heat_map: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """The image with all but its `fraction` highest-attribution pixels blacked out."""
    cut = np.quantile(heat_map, 1 - fraction)
    keep = heat_map >= cut if heat_map.max() > 0 else np.zeros_like(heat_map, dtype=bool)
    return image * keep[..., None]


def render(crop: torch.Tensor, attributions: torch.Tensor, title: str) -> str:
    """uint8-range crop [3, S, S] (floats in [0, 1]) + its attributions → base64 PNG of the 2x2 grid."""
    import colorcet
    from matplotlib.figure import Figure

    image = crop.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    heat_map = heat(attributions)
    cmap = colorcet.cm["bgyw"]
    figure = Figure(figsize=(6, 6.4), dpi=80)
    axes = figure.subplots(2, 2)
    panels = [
        ("input (center crop)", image, None),
        ("attribution (bgyw)", heat_map, cmap),
        ("attribution over input", None, None),
        (f"top {TOP_FRACTION:.0%} pixels", top_pixels(image, heat_map), None),
    ]
    for ax, (name, data, colours) in zip(axes.flat, panels):
        if data is None:
            ax.imshow(image)
            ax.imshow(heat_map, cmap=cmap, alpha=0.55, vmin=0, vmax=1)
        elif colours is not None:
            ax.imshow(data, cmap=colours, vmin=0, vmax=1)
        else:
            ax.imshow(data)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return _png(figure, title, 11)


def _png(figure, title: str, size: int) -> str:
    """The figure under its title → base64 PNG."""
    figure.suptitle(title, fontsize=size)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def positive_heat(saliency: torch.Tensor) -> np.ndarray:
    """[H, W] signed D-RISE saliency → [H, W] in [0, 1]: its positive part scaled by its 99.5th percentile."""
    positive = saliency.clamp_min(0).numpy().astype(np.float64)
    top = np.percentile(positive, 99.5)
    if not np.isfinite(top) or top <= 0:
        top = positive.max()
    return np.clip(positive / top, 0, 1) if top > 0 else np.zeros_like(positive)


def render_detection(image: torch.Tensor, saliency: torch.Tensor, box: tuple[float, float, float, float],
                     title: str) -> str:
    """[3, H, W] image in [0, 1] + one detection's [H, W] saliency → base64 PNG: the image with the box, and the
    heat map (bgyw, white = most support; only where seeing the pixel raises the detection) over the image."""
    import colorcet
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
    height, width = picture.shape[:2]
    figure = Figure(figsize=(8, 8 * height / width / 2 + 0.8), dpi=80)
    axes = figure.subplots(1, 2)
    for ax, name, overlay in zip(axes, ("input", "D-RISE saliency over input"), (False, True)):
        ax.imshow(picture)
        if overlay:
            ax.imshow(positive_heat(saliency), cmap=colorcet.cm["bgyw"], alpha=0.6, vmin=0, vmax=1)
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return _png(figure, title, 10)
