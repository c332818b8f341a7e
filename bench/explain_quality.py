"""Explanation quality: insertion / deletion AUC per algorithm vs random, and a model-randomization
sanity check.

    uv run python bench/explain_quality.py [--images 24] [--epochs 6]

The synthetic classifier: a small CNN (3 conv stages, ReLU, global pooling) trained here on 64x64
images of textured grey noise with one coloured square (the class: red, green or blue) at a random
place, plus a grey distractor square. For held-out images each method's attribution (|sum| over
channels, as drawn in the PNG) orders the pixels:
- insertion AUC: start from a uniform grey image, reveal the most-attributed pixels first (16
  steps); mean probability of the explained class. Higher is better (a blurred start would not
  do here: a blurred coloured square is still that colour);
- deletion AUC: start from the image, grey out the most-attributed pixels first. Lower is better;
- random: the same curves for a uniformly random order. Target: every method beats random on
  insertion AUC;
- randomization (Adebayo et al. 2018): Spearman rank correlation between the attribution maps of
  the trained model and of the same architecture re-initialised at random; low = the method
  depends on what the model learned (a method that returns an edge detector would score high).
Writes bench/results/explain_quality.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402
from explain import make_explainer
from explain.params import ALGORITHMS, parse_xai
from explain.methods import attribute  # noqa: E402
from explain.visualize import heat  # noqa: E402
from models.tasks.classification import normalize  # noqa: E402

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
STEPS = 16


def make_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 3, 64, 64] pixels in [0, 1] and class indices."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        grey = rng.integers(40, 220, (SIZE, SIZE), dtype=np.uint8)
        pixels = np.repeat(grey[..., None], 3, axis=2)
        for distractor in (True, False):
            side = int(rng.integers(14, 24))
            y, x = rng.integers(0, SIZE - side, 2)
            label = int(rng.integers(3))
            colour = (int(rng.integers(60, 200)),) * 3 if distractor else list(COLOURS.values())[label]
            pixels[y:y + side, x:x + side] = colour
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


class SmallCNN(nn.Module):
    """3 conv stages (conv, BatchNorm, ReLU), global average pooling, a linear head."""

    def __init__(self):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        # `features`: explain.guided's GradCAM layer is its last block (the last conv stage)
        self.features = nn.Sequential(stage(3, 16), nn.MaxPool2d(2), stage(16, 32), nn.MaxPool2d(2), stage(32, 64))
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 32):
            batch = order[start:start + 32]
            loss = F.cross_entropy(model(normalize(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return loss.item()


def curves(explainer, image: torch.Tensor, target: int, order: np.ndarray) -> tuple[float, float]:
    """Insertion and deletion AUC of revealing / greying pixels in `order` (most important first)."""
    grey = torch.full_like(image, 0.5)  # uniform grey: carries no class evidence (a blur keeps the colour)
    flat = np.zeros(SIZE * SIZE, dtype=bool)
    inserted, deleted = [], []
    for k in range(STEPS + 1):
        flat[:] = False
        flat[order[: int(round(k / STEPS * SIZE * SIZE))]] = True
        mask = torch.from_numpy(flat.reshape(SIZE, SIZE))
        inserted.append(torch.where(mask, image, grey))
        deleted.append(torch.where(mask, grey, image))
    with torch.no_grad():
        probs = explainer.model(torch.stack(inserted + deleted))[:, target].numpy()
    auc = lambda p: float(np.trapezoid(p, dx=1 / STEPS))  # noqa: E731
    return auc(probs[: STEPS + 1]), auc(probs[STEPS + 1:])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.ravel().argsort().argsort(), b.ravel().argsort().argsort()
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="held-out images explained per method")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-steps", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    images, labels = make_images(800, seed=0)
    test_images, test_labels = make_images(args.images, seed=1)
    model = SmallCNN()
    started = time.perf_counter()
    loss = train(model, images, labels, args.epochs)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(normalize(test_images)).argmax(1) == test_labels).float().mean())
    print(f"trained in {time.perf_counter() - started:.0f} s: last loss {loss:.3f}, held-out accuracy {accuracy:.2f}")
    trained = make_explainer(model, "small_cnn", multilabel=False, device=torch.device("cpu"))
    scrambled = SmallCNN()
    torch.manual_seed(123)
    for module in scrambled.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    randomized = make_explainer(scrambled.eval(), "small_cnn", multilabel=False, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = []
    for algorithm in ("random", *ALGORITHMS):
        xai = parse_xai({"xai_algorithm": algorithm if algorithm != "random" else "xrai", "n_steps": args.n_steps})
        ins, dels, corr, seconds = [], [], [], 0.0
        for image, label in zip(test_images, test_labels):
            with torch.no_grad():
                target = int(trained.model(image[None])[0].argmax())  # explained: the predicted class
            if algorithm == "random":
                importance = rng.random((SIZE, SIZE))
            else:
                started = time.perf_counter()
                importance = heat(attribute(trained, image[None], target, xai))
                seconds += time.perf_counter() - started
                other = heat(attribute(randomized, image[None], target, xai))
                corr.append(spearman(importance, other))
            order = np.argsort(-(importance.ravel() + rng.random(SIZE * SIZE) * 1e-9))  # ties: random
            i, d = curves(trained, image, target, order)
            ins.append(i)
            dels.append(d)
        rows.append({"algorithm": algorithm, "insertion_auc": round(float(np.mean(ins)), 4),
                     "deletion_auc": round(float(np.mean(dels)), 4),
                     "randomization_spearman": round(float(np.mean(corr)), 3) if corr else None,
                     "s_per_image": round(seconds / len(test_images), 3) if corr else None})
        print(rows[-1], flush=True)
    random_insertion = rows[0]["insertion_auc"]
    for row in rows[1:]:
        row["beats_random_insertion"] = row["insertion_auc"] > random_insertion
    print(table(rows, ["algorithm", "insertion_auc", "deletion_auc", "beats_random_insertion",
                       "randomization_spearman", "s_per_image"]))
    path = write("explain_quality", {"classifier": "small CNN on 64x64 coloured-square images",
                                     "held_out_accuracy": round(accuracy, 3), "images": args.images,
                                     "n_steps": args.n_steps, "steps_per_curve": STEPS, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
