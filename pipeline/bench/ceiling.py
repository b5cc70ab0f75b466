"""The encoders' ceiling: the two towers alone on ready tensors, with the encoder actors' own resources."""

from __future__ import annotations

import time

import numpy as np

from pipeline.bench.towers import time_towers
from pipeline.config import JobCfg, actor_range


class CeilingProbe:
    """A Ray actor with the encoder actors' resources: the two towers on ready tensors, nothing else."""

    def __init__(self, cfg: JobCfg, random_weights: bool):
        from pipeline.embed.encode import Encoder

        started = time.perf_counter()
        self.encoder = Encoder(cfg, random_weights)
        self.load_s = time.perf_counter() - started

    def measure(self, input_ids: np.ndarray, min_seconds: float, min_batches: int, variant: str | None = None) -> dict:
        return dict(time_towers(self.encoder, input_ids, min_seconds, min_batches, variant),
                    model_load_s=round(self.load_s, 3))


def measure_ceiling(cfg: JobCfg, random_weights: bool, input_ids: np.ndarray, seconds: float, use_ray: bool,
                    variants: tuple[str, ...] = ()) -> dict:
    """One probe per encoder actor, with its resources, all timed at once: the pool's ceiling is their sum.
    Without Ray, one per encoder process, as the job's run without Ray has them. `variants` (towers.VARIANTS): the
    same probes timed again with the towers so, each reported beside the config's as "variants"."""
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
            varied = {v: ray.get([p.measure.remote(input_ids, seconds, 3, v) for p in probes]) for v in variants}
        finally:
            for p in probes:
                ray.kill(p)
    else:
        from pipeline.bench.inprocess import EncoderProcesses

        encoders = EncoderProcesses(cfg, random_weights)
        try:
            each = encoders.ceiling(input_ids, seconds)
            varied = {v: encoders.ceiling(input_ids, seconds, v) for v in variants}
        finally:
            encoders.close()
    figures = {"pairs_per_s": round(sum(m["pairs_per_s"] for m in each), 3),
            "per_actor_pairs_per_s": [m["pairs_per_s"] for m in each], "batches": sum(m["batches"] for m in each),
            "model_load_s": max(m["model_load_s"] for m in each), "device": each[0]["device"]}
    if variants:
        figures["variants"] = {v: {"pairs_per_s": round(sum(m["pairs_per_s"] for m in runs), 3),
                                   **({"cuda_graph_capture_failed": runs[0]["cuda_graph_capture_failed"]}
                                      if "cuda_graph_capture_failed" in runs[0] else {})}
                               for v, runs in varied.items()}
    return figures
