"""The encoders' ceiling: the two towers alone on ready tensors, with the encoder actors' own resources."""

from __future__ import annotations

import time

import numpy as np

from pipeline.config import JobCfg, actor_range


class CeilingProbe:
    """A Ray actor with the encoder actors' resources: the two towers on ready tensors, nothing else."""

    def __init__(self, cfg: JobCfg, random_weights: bool):
        from pipeline.embed.encode import Encoder

        started = time.perf_counter()
        self.encoder = Encoder(cfg, random_weights)
        self.load_s = time.perf_counter() - started
        self.batch_size = cfg.encoder.batch_size
        self.size = cfg.read.image_size

    def measure(self, input_ids: np.ndarray, min_seconds: float, min_batches: int) -> dict:
        return dict(time_towers(self.encoder, input_ids, min_seconds, min_batches), model_load_s=round(self.load_s, 3))


def time_towers(encoder, input_ids: np.ndarray, min_seconds: float, min_batches: int) -> dict:
    """pairs/s of an Encoder's two towers on one batch of random pixels, ready on its device, embedded again and
    again for at least `min_seconds` and `min_batches`."""
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


def measure_ceiling(cfg: JobCfg, random_weights: bool, input_ids: np.ndarray, seconds: float, use_ray: bool) -> dict:
    """One probe per encoder actor, with its resources, all timed at once: the pool's ceiling is their sum.
    Without Ray, one per encoder process, as the job's run without Ray has them."""
    if use_ray:
        import ray

        from pipeline.embed.run import ray_resources

        encode = ray_resources(cfg)["encode"]
        actor = {k: encode[k] for k in ("num_cpus", "num_gpus", "memory", "runtime_env") if k in encode}
        probes = [ray.remote(**actor)(CeilingProbe).remote(cfg, random_weights)
                  for _ in range(actor_range(cfg.encoder.actors)[0])]
        try:
            ray.get([p.__ray_ready__.remote() for p in probes])  # every model loaded before any timing starts
            each = ray.get([p.measure.remote(input_ids, seconds, 3) for p in probes])
        finally:
            for p in probes:
                ray.kill(p)
    else:
        from pipeline.bench.inprocess import EncoderProcesses

        encoders = EncoderProcesses(cfg, random_weights)
        try:
            each = encoders.ceiling(input_ids, seconds)
        finally:
            encoders.close()
    return {"pairs_per_s": round(sum(m["pairs_per_s"] for m in each), 3),
            "per_actor_pairs_per_s": [m["pairs_per_s"] for m in each], "batches": sum(m["batches"] for m in each),
            "model_load_s": max(m["model_load_s"] for m in each), "device": each[0]["device"]}
