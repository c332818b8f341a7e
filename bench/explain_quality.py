"""Explanation faithfulness measured against controls: classifiers' deletion / insertion AUC next to random, a
centre prior and an occlusion oracle, the model-randomization check, and D-RISE's pointing game and per-box
deletion curve.

    uv run python bench/explain_quality.py [--images 48] [--randomization-images 8] [--variant-images 12]
                                           [--n-steps 50] [--drise-images 6] [--drise-masks 300]
                                           [--only classifiers|d_rise]

The classifier is the demo's (serving/demo.py's recipe: resnet18 from scratch on 2000 synthetic 64x64 shape
images, 12 epochs); its first `--images` validation images are explained for the predicted class. With
`--train-images` <= 24 it is the tests' tiny resnet18 instead, which memorises its images, and those are explained
(an hour less of training on a busy 2-core machine; its figures say so in the JSON):
- deletion / insertion: pixels ordered by the method's |attribution| (summed over channels, as the PNG draws it;
  ties at random) are greyed out of the image (deletion) or revealed on a uniform grey image (insertion) in 16
  steps; the curve is the class probability. Deletion AUC: lower is better; insertion: higher is better;
- controls in the same harness: random (a random order), centre prior (the pixels nearest the centre first: no
  model at all), occlusion oracle (the probability drop when each 8x8 patch is greyed: it asks the model what
  the curves measure). The harness is trusted only when the oracle beats random on both curves;
- model randomization (Adebayo et al. 2018), cascading from the logits: the layers are re-initialised from fc
  down to conv1, one stage more each time, and the Spearman rank correlation between the trained and the
  randomized model's |attribution| maps is reported per stage (`--randomization-images`). A faithful method's
  correlation falls as the model is destroyed; a high one means the map follows the image, not the model;
- variants of integrated gradients measured the same way (what can be improved: the baseline, the steps,
  smoothing), on the first `--variant-images` images, to say in the README which helps.
The detector part: bench/_drise_quality.py. Writes bench/results/explain_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import table, write  # noqa: E402

SIZE = 64
STEPS = 16
PATCH = 8
TESTS_RECIPE_IMAGES = 24  # --train-images up to this: the tests' memorising recipe instead of the demo's
CASCADE = (("fc",), ("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))


def train_classifier(root: Path, images: int, validation: int, epochs: int | None = None):
    """The demo classifier (`epochs`: fewer than the demo's where the CPU is busy): (model folder,
    [(validation image path, its label)])."""
    import mlflow

    from models.data.synth import write_synthetic_dataset
    from models.job import build_job
    from models.train.loop import train
    from serving.demo import DEMOS

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    if images <= TESTS_RECIPE_IMAGES:  # the tests' recipe: a few images memorised, explained where it learnt them
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import NO_AUGMENT, RECIPES

        data = write_synthetic_dataset("image_classification", root / "data", images, image_size=(SIZE, SIZE),
                                       seed=0, validation_fraction=0.0)
        params = {**RECIPES["image_classification"], "weights": "none", "advanced_settings": NO_AUGMENT,
                  "early_stopping": 0, **({"number_of_epochs": epochs} if epochs else {})}
        validation_jsonl = data.train_jsonl
    else:
        recipe = DEMOS["image_classification"]
        data = write_synthetic_dataset("image_classification", root / "data", images, image_size=recipe["size"],
                                       seed=0, validation_fraction=validation / images)
        params = {**recipe["params"], **({"number_of_epochs": epochs} if epochs else {})}
        validation_jsonl = data.validation_jsonl
    job = build_job(task="image_classification", training_data=data.train_jsonl, validation_data=validation_jsonl,
                    params=params, output_dir=root / "out", experiment_name="bench")
    result = train(job, progress=False, report=lambda _: None)
    lines = [json.loads(line) for line in Path(validation_jsonl).read_text().splitlines()]
    return Path(result.model_dir), [(Path(validation_jsonl).parent / line["image_url"], line["label"])
                                    for line in lines]


def _pixels(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE))).copy())
                        .permute(2, 0, 1).float() / 255 for p in paths])


def curves(explainer, image: torch.Tensor, target: int, importance: np.ndarray, rng) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) of greying / revealing pixels most important first (ties at random)."""
    order = np.argsort(-(importance.ravel() + rng.random(SIZE * SIZE) * 1e-9))
    grey = torch.full_like(image, 0.5)  # uniform grey carries no shape evidence
    flat = np.zeros(SIZE * SIZE, dtype=bool)
    deleted, inserted = [], []
    for k in range(STEPS + 1):
        flat[:] = False
        flat[order[: int(round(k / STEPS * SIZE * SIZE))]] = True
        mask = torch.from_numpy(flat.reshape(SIZE, SIZE))
        deleted.append(torch.where(mask, grey, image))
        inserted.append(torch.where(mask, image, grey))
    with torch.no_grad():
        probs = explainer.model(torch.stack(deleted + inserted))[:, target].numpy()
    auc = lambda p: float(np.trapezoid(p, dx=1 / STEPS))  # noqa: E731
    return auc(probs[: STEPS + 1]), auc(probs[STEPS + 1:])


def occlusion_oracle(explainer, image: torch.Tensor, target: int) -> np.ndarray:
    """The probability drop when each PATCH x PATCH patch is greyed, spread over its pixels."""
    occluded = []
    for y in range(0, SIZE, PATCH):
        for x in range(0, SIZE, PATCH):
            copy_ = image.clone()
            copy_[:, y:y + PATCH, x:x + PATCH] = 0.5
            occluded.append(copy_)
    with torch.no_grad():
        base = float(explainer.model(image[None])[0, target])
        drops = base - explainer.model(torch.stack(occluded))[:, target].numpy()
    grid = drops.reshape(SIZE // PATCH, SIZE // PATCH)
    return np.kron(grid, np.ones((PATCH, PATCH)))


def centre_prior() -> np.ndarray:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    return -np.hypot(xs - SIZE / 2, ys - SIZE / 2)


def ig_variant(baseline: str, steps: int, smooth: int):
    """Integrated gradients of the class probability with another baseline, more steps, or SmoothGrad noise."""
    from captum.attr import IntegratedGradients, NoiseTunnel
    from torchvision.transforms.functional import gaussian_blur

    def method(explainer, pixels: torch.Tensor, target: int, xai) -> torch.Tensor:
        base = {"black": torch.zeros_like(pixels), "grey": torch.full_like(pixels, 0.5),
                "blur": gaussian_blur(pixels, [31, 31], [8.0, 8.0])}[baseline]
        ig = IntegratedGradients(explainer.model)
        with torch.enable_grad():
            if smooth:
                attr = NoiseTunnel(ig).attribute(pixels, nt_type="smoothgrad", nt_samples=smooth, stdevs=0.1,
                                                 baselines=base, target=target, n_steps=steps,
                                                 internal_batch_size=64)
            else:
                attr = ig.attribute(pixels, baselines=base, target=target, n_steps=steps, internal_batch_size=64)
        return attr[0].detach()

    return method


VARIANTS = {
    "integrated_gradients, grey baseline": ig_variant("grey", 50, 0),
    "integrated_gradients, blurred baseline": ig_variant("blur", 50, 0),
    "integrated_gradients, 200 steps": ig_variant("black", 200, 0),
    "integrated_gradients, smoothgrad x4": ig_variant("black", 50, 4),
}


def _heat(explainer, image: torch.Tensor, target: int, name: str, n_steps: int) -> np.ndarray:
    from explain.methods import attribute
    from explain.params import parse_xai
    from explain.visualize import heat

    if name in VARIANTS:
        with torch.inference_mode(False):
            return heat(VARIANTS[name](explainer, image[None].clone(), target, None).float().cpu())
    return heat(attribute(explainer, image[None], target, parse_xai({"xai_algorithm": name, "n_steps": n_steps})))


def randomized(model: torch.nn.Module, depth: int, seed: int) -> torch.nn.Module:
    """A copy with the CASCADE's first `depth` stages (from the logits down) re-initialised."""
    scrambled = copy.deepcopy(model)
    torch.manual_seed(seed)
    for names in CASCADE[:depth]:
        for name in names:
            for module in getattr(scrambled, name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return scrambled.eval()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():  # a map that became constant (GradCAM of a dead layer): correlation 0
        warnings.simplefilter("ignore")
        value = spearmanr(a.ravel(), b.ravel()).statistic
    return float(value) if np.isfinite(value) else 0.0


def classifier_quality(args) -> dict:
    from explain import ALGORITHMS, make_explainer
    from serving.loading import ModelFolder, load_model

    root = Path(tempfile.mkdtemp(prefix="visionserve-explain-quality-"))
    started = time.perf_counter()
    folder, validation = train_classifier(root, args.train_images, args.images, args.epochs)
    validation = validation[: args.images]
    opened = ModelFolder.open(folder)
    loaded = load_model(opened, opened.plan("torch", "cpu"))
    spec, device = opened.model_settings, torch.device("cpu")
    explainer = make_explainer(loaded.model, "resnet18", False, device, spec.settings.image_mean, spec.settings.image_std)
    images = _pixels([path for path, _ in validation])
    with torch.no_grad():
        predicted = explainer.model(images).argmax(1)
    truth = torch.tensor([spec.labels.index(label) for _, label in validation])
    accuracy = float((predicted == truth).float().mean())
    print(f"trained the demo classifier in {time.perf_counter() - started:.0f} s: validation accuracy "
          f"{accuracy:.2f} on {len(images)} images", flush=True)
    cascade = [make_explainer(randomized(loaded.model, d, 100 + d), "resnet18", False, device,
                              spec.settings.image_mean, spec.settings.image_std) for d in range(1, len(CASCADE) + 1)]
    rng = np.random.default_rng(0)
    rows = []
    for name in ("random", "centre prior", "occlusion oracle", *ALGORITHMS, *VARIANTS):
        dels, inss, corr, seconds = [], [], [[] for _ in CASCADE], 0.0
        for i, (image, target) in enumerate(zip(images, predicted.tolist())):
            if name in VARIANTS and i >= args.variant_images:
                break
            begun = time.perf_counter()
            if name == "random":
                importance = rng.random((SIZE, SIZE))
            elif name == "centre prior":
                importance = centre_prior()
            elif name == "occlusion oracle":
                importance = occlusion_oracle(explainer, image, target)
            else:
                importance = _heat(explainer, image, target, name, args.n_steps)
            seconds += time.perf_counter() - begun
            d, n = curves(explainer, image, target, importance, rng)
            dels.append(d)
            inss.append(n)
            if name in ALGORITHMS and i < args.randomization_images:
                for depth, other in enumerate(cascade):
                    corr[depth].append(spearman(importance, _heat(other, image, target, name, args.n_steps)))
        row = {"map": name, "images": len(dels), "deletion_auc": round(float(np.mean(dels)), 4),
               "insertion_auc": round(float(np.mean(inss)), 4), "s_per_image": round(seconds / len(dels), 3)}
        if corr[0]:
            row["randomization_spearman"] = {"+".join(stage): round(float(np.mean(c)), 3)
                                             for stage, c in zip(CASCADE, corr)}
        rows.append(row)
        print(row, flush=True)
    return _judged(rows, accuracy, args) | {"train_images": args.train_images - args.images * (
                                            args.train_images > TESTS_RECIPE_IMAGES),
                                            "epochs": args.epochs or 12}


def _judged(rows: list[dict], accuracy: float, args) -> dict:
    """Each map against random and the centre prior on both curves; the harness's trust from the oracle."""
    control = {r["map"]: r for r in rows}
    random_, centre, oracle = control["random"], control["centre prior"], control["occlusion oracle"]

    def beats(row: dict, other: dict) -> bool:
        return row["deletion_auc"] < other["deletion_auc"] and row["insertion_auc"] > other["insertion_auc"]

    for row in rows[3:]:
        row["beats_random"], row["beats_centre_prior"] = beats(row, random_), beats(row, centre)
        spearman_by_stage = row.get("randomization_spearman")
        if spearman_by_stage:
            row["spearman_logits_only"] = spearman_by_stage["fc"]
            row["spearman_all_random"] = spearman_by_stage["conv1+bn1"]
    recipe = ("the tests' recipe: memorised images, explained" if args.train_images <= TESTS_RECIPE_IMAGES
              else "the demo's recipe, held-out images explained")
    return {"classifier": f"resnet18, 64x64 synthetic shapes, {recipe}", "accuracy": round(accuracy, 3),
            "images": args.images, "randomization_images": args.randomization_images, "n_steps": args.n_steps,
            "steps_per_curve": STEPS, "harness_trusted": beats(oracle, random_), "rows": rows}


def _earlier() -> dict:
    from bench._common import RESULTS

    path = RESULTS / "explain_quality.json"
    if not path.exists():
        return {}
    found = json.loads(path.read_text())
    return {k: found[k] for k in ("classifiers", "d_rise") if k in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="validation images explained per method")
    parser.add_argument("--train-images", type=int, default=2000,
                        help=f"<= {TESTS_RECIPE_IMAGES}: the tests' recipe (memorised images, explained)")
    parser.add_argument("--epochs", type=int, default=None, help="the demo's 12 unless given")
    parser.add_argument("--randomization-images", type=int, default=8)
    parser.add_argument("--variant-images", type=int, default=12, help="images for the integrated-gradients variants")
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--drise-images", type=int, default=6)
    parser.add_argument("--drise-masks", type=int, default=300)
    parser.add_argument("--drise-resolution", type=int, default=8)
    parser.add_argument("--detector-model", type=Path, help="a tiny detector folder trained before (else trained)")
    parser.add_argument("--detector-data", type=Path, help="its training JSONL")
    parser.add_argument("--only", choices=("classifiers", "d_rise"), default=None)
    args = parser.parse_args()
    results: dict = _earlier() if args.only else {}  # one part rerun: the other part's last figures are kept
    if args.only != "d_rise":
        results["classifiers"] = classifier_quality(args)
        print(f"harness trusted (the occlusion oracle beats random on both curves): "
              f"{results['classifiers']['harness_trusted']}")
        print(table(results["classifiers"]["rows"], ["map", "images", "deletion_auc", "insertion_auc", "beats_random",
                                                     "beats_centre_prior", "spearman_logits_only",
                                                     "spearman_all_random", "s_per_image"]))
    if args.only != "classifiers":
        from bench._drise_quality import drise_quality

        results["d_rise"] = found = drise_quality(args.drise_images, args.drise_masks, args.drise_resolution,
                                                      model=args.detector_model, train_jsonl=args.detector_data)
        print(table([{"map": k, "deletion_auc": v} for k, v in found["deletion_auc"].items()], ["map", "deletion_auc"]))
        print(f"pointing game {found['pointing_game']:.3f} (chance {found['pointing_chance']:.3f}) over "
              f"{found['detections']} detections; positive saliency inside the box {found['positive_mass_inside_box']:.3f}")
    path = write("explain_quality", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
