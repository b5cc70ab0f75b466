"""The whole embed job on the benchmark's shards (with Ray, or its stages in this process without it), with its
memory and GPU busy fraction, and how its peak memory grows with the input."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import psutil

from pipeline.bench.photos import make_benchmark_shards
from pipeline.bench.samplers import GpuBusySampler, MemorySampler
from pipeline.config import JobCfg, actor_range

log = logging.getLogger(__name__)


def end_to_end(cfg: JobCfg, shards: list[Path], out: Path, use_ray: bool, random_weights: bool,
               tokenizer: tuple[str, str | None], memory_interval_s: float = 10.0) -> dict:
    """The embed job on `shards` (with Ray), or its stages driven in this process (without Ray). Reading every
    process's PSS costs the driver ~40 ms a time, taken from the encoders: timed runs sample it rarely, the
    memory-scaling runs often."""
    with MemorySampler(memory_interval_s) as memory, GpuBusySampler() as gpu:
        if use_ray:
            from pipeline.embed.run import run_embed_job

            input_url = "{" + ",".join(str(p) for p in shards) + "}" if len(shards) > 1 else str(shards[0])
            wait_for_actors_to_exit()
            summary = run_embed_job(dataclasses.replace(cfg, input=input_url, output=str(out), overwrite=True))
            figures = {"pairs": summary["samples"], "ok": summary["ok"], "wall_s": summary["wall_s"],
                       "startup_s": summary.get("startup_s"), "steady_pairs_per_s": summary.get("steady_pairs_per_s"),
                       "whole_run_pairs_per_s": summary["pairs_per_s"], "steady_window": summary.get("steady_window"),
                       "ray": True}
            parquet = list((out / "embeddings").glob("*.parquet"))
        else:
            from pipeline.bench.inprocess import run_without_ray

            figures = run_without_ray(cfg, [str(p) for p in shards], random_weights, tokenizer, out)
            parquet = list(out.glob("*.parquet"))
    figures["gpu_busy_steady"] = gpu.busy_fraction(*figures["steady_window"]) if figures["steady_window"] else None
    figures.update({"peak_memory_mib": round(memory.peak_bytes / 2**20, 1),
                    "peak_rss_sum_mib": round(memory.peak_rss_sum_bytes / 2**20, 1),
                    "parquet_bytes_per_pair": round(sum(p.stat().st_size for p in parquet) / max(figures["pairs"], 1), 1)})
    return figures


def wait_for_actors_to_exit(timeout_s: float = 60.0) -> None:
    """Killed actors (a finished run's encoder pool, the ceiling probes) exit asynchronously: wait for them,
    so that their memory is not counted in the next run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lingering = []
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if " ".join(proc.cmdline()).startswith(("ray::MapWorker", "ray::CeilingProbe")):
                    lingering.append(proc.pid)
        if not lingering:
            return
        time.sleep(0.5)
    log.warning("actor processes %s still alive after %.0f s: the next memory figure includes them",
                lingering, timeout_s)


def memory_scaling(cfg: JobCfg, cache: Path, per_shard: int, random_weights: bool,
                   tokenizer: tuple[str, str | None]) -> dict:
    """Peak memory of the job on enough shards to give every encoder actor a batch, and on 8x as many.

    Streaming with bounded in-flight blocks keeps the two peaks close. The small run must keep every
    actor busy: on fewer shards some actors hold weights but never the activations of a batch.
    """
    actors = actor_range(cfg.encoder.actors)[1]
    small_shards = max(1, -(-actors * cfg.encoder.batch_size // per_shard))
    shards = make_benchmark_shards(cache / f"shards-v2-{per_shard}", 8 * small_shards, per_shard)

    def run(n: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return end_to_end(cfg, shards[:n], Path(tmp) / "out", True, random_weights, tokenizer,
                              memory_interval_s=0.5)

    small, large = run(small_shards), run(8 * small_shards)
    return {"precision": cfg.model.precision, "decode_on": cfg.read.decode_on, "pairs_small": small["pairs"], "pairs_large": large["pairs"],
            "peak_mib_small": small["peak_memory_mib"], "peak_mib_large": large["peak_memory_mib"],
            "growth": round(large["peak_memory_mib"] / small["peak_memory_mib"] - 1, 3),
            "peak_rss_sum_mib_small": small["peak_rss_sum_mib"], "peak_rss_sum_mib_large": large["peak_rss_sum_mib"],
            "rss_sum_growth": round(large["peak_rss_sum_mib"] / small["peak_rss_sum_mib"] - 1, 3)}
