"""Checks before any training work: enough images and classes, known labels, usable image files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from models.data.formats import MAX_TRAINING_BYTES, MAX_TRAINING_SIDE, MIN_SIDE
from models.data.images import image_size
from models.data.records import Dataset, Record
from models.errors import DataError, ImageError, Problem

MIN_TRAINING_IMAGES = 10


def check_training_images(records: Iterable[Record]) -> list[Problem]:
    """Every image exists, is readable, at least 50x50, at most 10,240 per side and 20 MB."""
    problems = []
    for r in records:
        try:
            size = os.stat(r.image).st_size
            width, height = image_size(r.image)
        except FileNotFoundError:
            problems.append(Problem(r.source, r.line, "image_url", f"image not found: {r.image}"))
            continue
        except ImageError as exc:
            problems.append(Problem(r.source, r.line, "image_url", f"{r.image}: {exc}"))
            continue
        if width < MIN_SIDE or height < MIN_SIDE:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {width}x{height}; images must be at least {MIN_SIDE}x{MIN_SIDE}"))
        elif max(width, height) > MAX_TRAINING_SIDE:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {width}x{height}; training images are at most {MAX_TRAINING_SIDE} per side"))
        if size > MAX_TRAINING_BYTES:
            problems.append(Problem(r.source, r.line, "image_url",
                                    f"{r.image} is {size / 1e6:.1f} MB; training images must be under 20 MB"))
    return problems


def check_labels(validation: Dataset, known: Sequence[str]) -> list[Problem]:
    """Validation labels must all be labels the model is trained on."""
    known_set = set(known)
    problems = []
    for r in validation.records:
        for i, name in enumerate(r.label_names()):
            if name not in known_set:
                where = "label" if isinstance(r.label, str) else f"label[{i}]"
                problems.append(Problem(r.source, r.line, where,
                                        f"{name!r} is not a label of the training data ({', '.join(sorted(known_set))})"))
    return problems


def check_training_set(train: Dataset, validation: Dataset | None, min_images: int = MIN_TRAINING_IMAGES) -> None:
    """All checks before any training starts; raises DataError listing every problem."""
    problems = list(train.problems)
    if validation is not None:
        problems += validation.problems
    if not problems:
        total = len(train.records)
        if total < min_images:
            problems.append(Problem(train.source, None, "",
                                    f"{total} image(s); at least {min_images} are needed to train"))
        labels = train.labels()
        if len(labels) < 2 and isinstance(train.records[0].label, str):
            problems.append(Problem(train.source, None, "label",
                                    f"only one class ({', '.join(labels)}); classification needs at least 2"))
        if validation is not None:
            problems += check_labels(validation, labels)
    problems += check_training_images(train.records)  # the lines that were read, even when others were not
    if validation is not None:
        problems += check_training_images(validation.records)
    if problems:
        raise DataError(problems, "the training data")
