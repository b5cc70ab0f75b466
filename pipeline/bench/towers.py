"""An encoder's two towers timed alone on ready tensors (the ceiling's measurement), as configured or varied."""

from __future__ import annotations

import contextlib
import time

import numpy as np


# the towers as they were before the fixed-shape work (weights cast by autocast on every batch), and with CUDA
# graphs (encoder.cuda_graphs): the benchmark's ceiling "before" and "after"
VARIANTS = ("weights_cast_per_batch", "cuda_graphs")


@contextlib.contextmanager
def tower_variant(encoder, variant: str | None):
    if variant == "weights_cast_per_batch":
        encoder.cast_weights(once=False)
        try:
            yield
        finally:
            encoder.cast_weights(once=True)
    elif variant == "cuda_graphs":
        before, encoder.cuda_graphs = encoder.cuda_graphs, True
        try:
            yield
        finally:
            encoder.cuda_graphs = before
    elif variant is None:
        yield
    else:
        raise ValueError(f"unknown tower variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def time_towers(encoder, input_ids: np.ndarray, min_seconds: float, min_batches: int,
                variant: str | None = None) -> dict:
    """pairs/s of an Encoder's two towers on one batch of random pixels, ready on its device, embedded again and
    again for at least `min_seconds` and `min_batches`; `variant`: one of VARIANTS instead of the config's."""
    with tower_variant(encoder, variant):
        figures = _time_towers(encoder, input_ids, min_seconds, min_batches)
        graphs = getattr(encoder._thread, "graphs", {}) if variant == "cuda_graphs" else {}
        if any(graph.failed for graph in graphs.values()):
            figures["cuda_graph_capture_failed"] = sorted(name for name, graph in graphs.items() if graph.failed)
    return figures


def _time_towers(encoder, input_ids: np.ndarray, min_seconds: float, min_batches: int) -> dict:
    rng = np.random.default_rng(0)
    size = encoder.image_size
    pixels = rng.integers(0, 256, (encoder.batch_size, size, size, 3), dtype=np.uint8)
    images = encoder.to_device(pixels).permute(0, 3, 1, 2)  # ready on the device, as decoded there
    ids = input_ids[: encoder.batch_size]
    for _ in range(2):  # warm-up: allocator, kernel selection (bf16 oneDNN primitives), caches
        encoder.embed(images, ids)
    batches, started = 0, time.perf_counter()
    while batches < min_batches or time.perf_counter() - started < min_seconds:
        encoder.embed(images, ids)
        batches += 1
    elapsed = time.perf_counter() - started
    return {"pairs_per_s": round(batches * encoder.batch_size / elapsed, 3), "batches": batches,
            "device": str(encoder.device)}
