"""A classifier compiled for CPU scoring: torch.compile (inductor) with its weights frozen into the code.

Measured on this project's 2-core VM, resnet18 at 224, one torch thread: the eager model (BatchNorm
folded, channels_last) takes 25.9 ms per image one at a time and 19.1 at four; compiled, 17.7 and 16.7.
Batches that a busy endpoint forms are mostly small, so that is where it pays (the served
throughput at concurrency 8 went up by about a third, see README). The price is start-up: each
batch size is compiled once, 15-25 s for a resnet replica on a fresh machine (inductor's on-disk
cache makes it about half that the next time; vits16r224: 40 s, for 5-16 % less time per image),
and a C++ compiler on the machine (g++).

Compiled code is specialised to shapes, so `Compiled` keeps a few fixed batch sizes and runs any
batch as chunks of them; an input of another shape (a request that sets valid_crop_size) goes to
the eager model instead of compiling in the request path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

BATCH_SIZES = (4, 2, 1)  # a batch of 7 runs as 4 + 2 + 1; per image, 4 is within 6 % of 8 and 16 on a CPU


class Compiled(torch.nn.Module):
    """`compiled` for inputs of `shape` (one image), in chunks of `sizes` images; `eager` for any other input."""

    def __init__(self, compiled, eager: torch.nn.Module, shape: tuple[int, ...], sizes: Sequence[int]):
        super().__init__()
        self.compiled, self.eager, self.shape = compiled, eager, tuple(shape)
        self.sizes = tuple(sorted(sizes, reverse=True))  # chunks, largest first

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.shape or not images.is_contiguous():
            return self.eager(images)
        outputs, start = [], 0
        for size in self.sizes:
            while len(images) - start >= size:
                outputs.append(self.compiled(images[start:start + size]))
                start += size
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def compile_for_cpu(model: torch.nn.Module, shape: tuple[int, ...],
                    sizes: Sequence[int] = BATCH_SIZES) -> torch.nn.Module:
    """`model` (eval mode, on the CPU) compiled for contiguous float batches of `shape` images, each
    batch size in `sizes` compiled now; `model` itself, with a warning, when compilation fails
    (no C++ compiler, an operation inductor cannot handle)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)
    started = time.perf_counter()
    try:
        # freezing: weights become constants of the generated code (prepacked for oneDNN); only the
        # compilations made inside this block use it, and every batch size used later is made here
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            for size in sizes:
                compiled(torch.zeros(size, *shape))
    except Exception as exc:  # noqa: BLE001  (any compiler failure: score with the eager model)
        log.warning("torch.compile failed, scoring with the eager model (%s: %s)", type(exc).__name__,
                    (str(exc).strip().splitlines() or [""])[0])
        return model
    log.info("scorer compiled for batches of %s in %.1f s", "/".join(map(str, sizes)), time.perf_counter() - started)
    return Compiled(compiled, model, shape, sizes)
