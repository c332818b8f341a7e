"""stream_image_files: images read through fsspec (here its in-memory filesystem) with a bounded cache."""

from __future__ import annotations

import json
import os

import fsspec
import pytest

from models.job import build_job
from models.data.streaming import ImageCache, StreamedImage
from models.train.loop import prepare, train


def _upload(data, prefix: str) -> tuple:
    """The synthetic dataset's images copied to memory://<prefix>/, JSONLs rewritten to cloud URLs."""
    fs = fsspec.filesystem("memory")
    folder = data.train_jsonl.parent
    out = []
    for name in ("train.jsonl", "validation.jsonl"):
        lines = [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]
        for line in lines:
            fs.pipe(f"/{prefix}/{line['image_url']}", (folder / line["image_url"]).read_bytes())
            line["image_url"] = f"azureml://subscriptions/s/datastores/d/paths/{line['image_url']}"
        target = folder.parent / f"{prefix}-{name}"
        target.write_text("".join(json.dumps(line) + "\n" for line in lines))
        out.append(target)
    return tuple(out)


def test_cache_keeps_at_most_max_bytes_and_refetches(tmp_path):
    fs = fsspec.filesystem("memory")
    for i in range(5):
        fs.pipe(f"/cache-test/{i}.bin", bytes([i]) * 1000)
    cache = ImageCache(str(tmp_path / "cache"), max_bytes=2500)
    for i in range(5):
        path = cache.fetch(f"memory://cache-test/{i}.bin")
        assert path.read_bytes() == bytes([i]) * 1000
    sizes = [f.stat().st_size for f in (tmp_path / "cache").iterdir()]
    assert sum(sizes) <= 2500 and len(sizes) == 2
    assert os.fspath(StreamedImage("memory://cache-test/0.bin", cache)) == str(cache.path_for("memory://cache-test/0.bin"))
    with pytest.raises(FileNotFoundError, match="image not found"):
        cache.fetch("memory://cache-test/missing.bin")


@pytest.mark.slow
def test_training_streams_images_from_an_fsspec_root(synth, tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONSERVE_IMAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VISIONSERVE_IMAGE_CACHE_MB", "0.05")  # smaller than the data set: evictions happen
    data = synth("image_classification", images=16)
    train_jsonl, validation_jsonl = _upload(data, "stream-test")
    params = {"model_name": "mobilenetv2", "valid_resize_size": 64, "valid_crop_size": 64, "train_crop_size": 64,
              "training_batch_size": 4, "number_of_epochs": 1, "num_workers": 0,
              "advanced_settings": '{"stream_image_files": true}'}
    job = build_job(task="image_classification", training_data=train_jsonl, validation_data=validation_jsonl,
                    params=params, image_root="memory://stream-test", output_dir=tmp_path / "out",
                    experiment_name="tests")
    prepared = prepare(job)
    assert all(isinstance(r.image, StreamedImage) for r in prepared.train + prepared.validation)
    assert str(prepared.train[0].image).startswith("memory://stream-test/images/")
    result = train(job, progress=False, report=lambda _: None)
    assert (result.model_dir / "MLmodel").is_file()
    assert sum(f.stat().st_size for f in (tmp_path / "cache").iterdir()) <= 0.05 * 2**20
