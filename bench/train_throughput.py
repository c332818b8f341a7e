"""Training throughput: our training loop vs a bare torch loop, same model, batch, data and loader.

    uv run python bench/train_throughput.py [--epochs 3] [--images N]

Both loops iterate the very same DataLoader (same dataset, transforms and workers) over freshly
built models of the same architecture; the first epoch of each is a warm-up and not counted.
Target: ours >= 0.9 of the bare loop's images/s. Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import peak_rss_mb, private_mlflow_store, table, write  # noqa: E402
from models.tasks.architectures import build_model  # noqa: E402
from models.job import build_job  # noqa: E402
from models.train.optim import make_optimizer  # noqa: E402
from models.data.synth import write_synthetic_dataset  # noqa: E402
from models.train.loop import _Loop, prepare  # noqa: E402

CASES = {  # name: (task, image size, images, parameters); enough batches per epoch to average out noise
    "resnet18": ("image_classification", (96, 96), 320, {
        "weights": "none", "model_name": "resnet18", "training_batch_size": 16, "valid_resize_size": 80, "valid_crop_size": 80,
        "train_crop_size": 80}),
    "fasterrcnn_resnet18_fpn": ("image_object_detection", (128, 128), 120, {
        "weights": "none", "model_name": "fasterrcnn_resnet18_fpn", "training_batch_size": 4, "min_size": 128, "max_size": 128,
        "box_batch_size_per_image": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300}),
}


def _images(loader) -> int:
    return len(loader.dataset) - (len(loader.dataset) % loader.batch_size if loader.drop_last else 0)


def bare_epoch(model, loader, optimizer, task_ops, device) -> float:
    """The minimal loop: forward, loss, backward, step — nothing else."""
    model.train()
    start = time.perf_counter()
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        task_ops.loss(model, batch, device, None).backward()
        optimizer.step()
    return time.perf_counter() - start


def measure(name: str, epochs: int, images: int | None, workdir: Path) -> dict:
    task_name, size, default_images, params = CASES[name]
    images = images or default_images
    data = write_synthetic_dataset(task_name, workdir / name, images, image_size=size, seed=0)
    job = build_job(task=task_name, training_data=data.train_jsonl, validation_data=data.validation_jsonl,
                    params={**params, "number_of_epochs": epochs + 1, "num_workers": 1}, output_dir=workdir / "out",
                    experiment_name="bench")
    prepared = prepare(job)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    loop = _Loop(job, prepared, device, report=lambda _: None, progress=False)
    ops = job.task.ops
    torch.manual_seed(0)
    bare_model = build_model(prepared.arch, len(prepared.labels), prepared.settings, trainable_bn=True).to(device)
    bare_opt = make_optimizer(bare_model, prepared.settings)
    n = _images(loop.train_loader)
    ours, bare = [], []
    loop.train_epoch(0)  # warm-up: worker start, allocator, first-batch costs
    bare_epoch(bare_model, loop.train_loader, bare_opt, ops, device)
    for epoch in range(1, epochs + 1):  # interleaved so drift hits both equally
        start = time.perf_counter()
        loop.train_epoch(epoch)
        ours.append(time.perf_counter() - start)
        bare.append(bare_epoch(bare_model, loop.train_loader, bare_opt, ops, device))
    ours_ips, bare_ips = n * epochs / sum(ours), n * epochs / sum(bare)
    return {"model": name, "batch": loop.train_loader.batch_size, "images_per_epoch": n, "epochs": epochs,
            "ours_images_per_s": ours_ips, "bare_images_per_s": bare_ips, "ratio": ours_ips / bare_ips,
            "target": 0.9, "meets_target": ours_ips / bare_ips >= 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=None, help="synthetic images (default: per model)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    private_mlflow_store()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, args.epochs, args.images, Path(tmp)) for name in args.models]
    print(table(rows, ["model", "batch", "images_per_epoch", "ours_images_per_s", "bare_images_per_s", "ratio",
                       "meets_target"]))
    path = write("train_throughput", {"rows": rows, **peak_rss_mb()})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
