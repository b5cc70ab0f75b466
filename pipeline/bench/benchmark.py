"""Benchmark: the encoders' ceiling against the whole embed job, same machine, weights, precision and data."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench.ceiling import measure_ceiling
from pipeline.bench.decode_rate import decode_rate_per_core
from pipeline.bench.end_to_end import end_to_end, memory_scaling
from pipeline.bench.photos import caption, make_benchmark_shards, photo_pool
from pipeline.bench.samplers import gpu_available, machine
from pipeline.config import JobCfg, actor_range, resolve_actors
from pipeline.embed.preprocess import load_tokenizer, resolve_tokenizer, tokenize


def run_benchmark(cfg: JobCfg, pairs: int, per_shard: int, precisions: list[str], placements: list[str],
                  cache: Path, memory_check: bool, ceiling_seconds: float, use_ray: bool,
                  fidelity_photos: int, encoders_per_gpu: list[int] = (1,), report: dict | None = None,
                  after_phase=None) -> dict:
    """encoders_per_gpu (a GPU config): besides the runs at the config's layout, decode_on=encoder with k encoder
    actors (processes) sharing each GPU, each k with its own ceiling (its k probes timed at once). `report`: a
    dict filled as the figures come in, so that a caller can save those of a run that fails half-way;
    after_phase(name) is called after each phase (the job saves the figures so far: a run killed on a time
    limit keeps them)."""
    report = {} if report is None else report
    from pipeline.embed.model import decide_random_weights

    started = time.perf_counter()
    phases, last = {}, [started]

    def lap(name: str) -> None:  # where the run's time goes (the GPU run has 5 minutes)
        now = time.perf_counter()
        phases[name], last[0] = round(now - last[0], 1), now
        if after_phase is not None:
            after_phase(name)

    if use_ray:
        import ray

        from pipeline.embed.run import init_ray

        if not ray.is_initialized():
            init_ray(None, cfg.ray.num_cpus)
        cfg = resolve_actors(cfg, ray.cluster_resources())
    else:  # no cluster: this machine is all there is
        import torch

        cfg = resolve_actors(cfg, {"CPU": cfg.ray.num_cpus or os.cpu_count() or 1, "GPU": torch.cuda.device_count()})
    ray_start_s = time.perf_counter() - started
    lap("start")
    if cfg.encoder.num_gpus > 0:  # first: figures of a CUDA path that gives wrong pixels would mean nothing
        from pipeline.bench.gpu_checks import run_gpu_checks

        report["gpu_checks"] = run_gpu_checks(cfg)  # first in the JSON too
        lap("gpu_checks")
    n_shards = max(1, pairs // per_shard)
    shards = make_benchmark_shards(cache / f"shards-v2-{per_shard}", n_shards, per_shard)
    lap("shards")
    random_weights = decide_random_weights(cfg)
    tokenizer = resolve_tokenizer(cfg, random_weights)
    report.update({"machine": machine(), "pairs": n_shards * per_shard, "shards": n_shards, "ray": use_ray,
              "encoder_actors": cfg.encoder.actors, "encoder_batch_size": cfg.encoder.batch_size,
              "torch_threads": cfg.encoder.torch_threads, "batches_in_flight": cfg.encoder.batches_in_flight,
              "models": {"text": cfg.model.text, "image": cfg.model.image, "random_weights": random_weights},
              "cpu": decode_rate_per_core(cfg, shards[0], tokenizer), "runs": {}, "phase_s": phases})
    lap("cpu_rates")
    if not use_ray:
        from pipeline.bench.inprocess import read_workers

        report["without_ray"] = (f"Ray is not used: read + tokenize (+ decode) in {read_workers(cfg)} worker "
                                 f"processes, {cfg.encoder.actors} encoder process(es) spawned by the benchmark, "
                                 "each with its own CUDA context")
    texts = [caption(np.random.default_rng(i)) for i in range(cfg.encoder.batch_size)]
    input_ids = tokenize(load_tokenizer(*tokenizer), texts)
    report["ray_start_s"] = round(ray_start_s, 3)

    def configured(precision: str, placement: str = "tasks") -> JobCfg:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, precision=precision),
                                   read=dataclasses.replace(cfg.read, decode_on=placement))

    for precision in precisions:
        # the ceiling is measured right before and right after the end-to-end runs, and the higher one is
        # used: on a shared machine the CPU's speed drifts, and the ratio must not flatter the pipeline
        # and the towers as they were before weights were cast once, and with CUDA graphs: what each gains
        variants = (("weights_cast_per_batch",) if precision != "fp32" else ()) + (
            ("cuda_graphs",) if gpu_available() and cfg.encoder.num_gpus > 0 and not cfg.encoder.cuda_graphs else ())
        before = measure_ceiling(configured(precision), random_weights, input_ids, ceiling_seconds, use_ray, variants)
        runs = {}  # each run's figures enter the report as it ends (lap saves them)
        report["runs"][precision] = {"ceiling_before_pairs_per_s": before["pairs_per_s"], "decode_on": runs}
        if variants:
            report["runs"][precision]["ceiling_variants"] = {"as_configured": before["pairs_per_s"],
                                                             **before["variants"]}
        lap(f"{precision}_ceiling_before")
        for placement in placements:
            with tempfile.TemporaryDirectory() as tmp:
                runs[placement] = {"end_to_end": end_to_end(configured(precision, placement), shards,
                                                            Path(tmp) / "out", use_ray, random_weights, tokenizer)}
            lap(f"{precision}_{placement}")
        after = measure_ceiling(configured(precision), random_weights, input_ids, ceiling_seconds, use_ray)
        ceiling = max(before, after, key=lambda c: c["pairs_per_s"])
        for run in runs.values():
            e2e = run["end_to_end"]
            if e2e["steady_pairs_per_s"]:
                run["steady_ratio"] = round(e2e["steady_pairs_per_s"] / ceiling["pairs_per_s"], 3)
            run["whole_run_ratio"] = round(e2e["pairs"] / e2e["wall_s"] / ceiling["pairs_per_s"], 3)
        report["runs"][precision].update({"encoder_ceiling": ceiling,
                                          "ceiling_after_pairs_per_s": after["pairs_per_s"]})
        lap(f"{precision}_ceiling_after")
        if cfg.encoder.num_gpus > 0 and list(encoders_per_gpu) != [1]:
            # k = 1 is the config's own layout: its encoder run above, against that run's ceiling
            layouts = {1: {"encoder_actors": cfg.encoder.actors, "num_gpus_each": cfg.encoder.num_gpus,
                           "encoder_ceiling": ceiling, "end_to_end": runs["encoder"]["end_to_end"]}
                       } if "encoder" in runs else {}
            report["runs"][precision]["encoders_per_gpu"] = layouts
            sharing_gpus(configured(precision, "encoder"), encoders_per_gpu, shards, random_weights, tokenizer,
                         input_ids, ceiling_seconds, use_ray, layouts,
                         after_each=lambda k: lap(f"{precision}_{k}_encoders_per_gpu"))
    if memory_check and use_ray:  # once, with the last precision: memory does not depend on it
        report["memory_scaling"] = memory_scaling(configured(precisions[-1], placements[-1]), cache, per_shard,
                                                  random_weights, tokenizer)
        lap("memory_scaling")
    # last: its two towers, loaded in this process, must not count in the runs' memory
    if fidelity_photos:
        from pipeline.bench.fidelity import corrupted_routing, measure_fidelity

        rng = np.random.default_rng(7)
        report["fidelity"] = measure_fidelity(cfg, photo_pool(fidelity_photos, seed=7),
                                              [caption(rng) for _ in range(fidelity_photos)],
                                              "cuda" if gpu_available() else "cpu",
                                              lower_precision=next((p for p in precisions if p != "fp32"), None))
        report["fidelity"]["corrupted_jpegs"] = corrupted_routing(min(10 * fidelity_photos, 2000), 0,
                                                                  cfg.read.image_size, cfg.read.max_image_pixels)
        lap("fidelity")
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def sharing_gpus(cfg: JobCfg, encoders_per_gpu: list[int], shards: list[Path], random_weights: bool,
                 tokenizer: tuple[str, str | None], input_ids: np.ndarray, ceiling_seconds: float,
                 use_ray: bool, layouts: dict, after_each=lambda k: None) -> dict:
    """For each k: k encoders on every GPU the config's layout uses (encoder.num_gpus = its share / k), their
    ceiling (the k probes timed at once) and the whole job, into `layouts` ({k: figures}; a k already there is
    not run again), after_each(k) called as each ends; every ratio against the best ceiling of all k."""
    gpus = actor_range(cfg.encoder.actors)[1] * cfg.encoder.num_gpus
    for k in encoders_per_gpu:
        if k in layouts:
            continue
        shared = dataclasses.replace(cfg, encoder=dataclasses.replace(
            cfg.encoder, num_gpus=round(cfg.encoder.num_gpus / k, 4), actors=max(1, round(gpus * k / cfg.encoder.num_gpus))))
        ceiling = measure_ceiling(shared, random_weights, input_ids, ceiling_seconds, use_ray)
        with tempfile.TemporaryDirectory() as tmp:
            layouts[k] = {"encoder_actors": shared.encoder.actors, "num_gpus_each": shared.encoder.num_gpus,
                          "encoder_ceiling": ceiling,
                          "end_to_end": end_to_end(shared, shards, Path(tmp) / "out", use_ray, random_weights, tokenizer)}
        after_each(k)
    best = max(layout["encoder_ceiling"]["pairs_per_s"] for layout in layouts.values())
    for layout in layouts.values():
        e2e = layout["end_to_end"]
        layout["steady_ratio_to_best_ceiling"] = round(e2e["steady_pairs_per_s"] / best, 3) if e2e[
            "steady_pairs_per_s"] else None
    return layouts


def tiny_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Tiny random towers of the real layouts, for the CI smoke run only (never for reported figures)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, CLIPConfig, CLIPModel

    from pipeline.embed.preprocess import BUNDLED_VOCAB_DIR

    text, image = folder / "tiny-text", folder / "tiny-image"
    if not (text / "config.json").exists():
        BertForSequenceClassification(BertConfig(vocab_size=21128, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 num_labels=512)).save_pretrained(text)
        BertTokenizer.from_pretrained(str(BUNDLED_VOCAB_DIR)).save_pretrained(text)
    if not (image / "config.json").exists():
        CLIPModel(CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64),
                             vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=224, patch_size=32),
                             projection_dim=512)).save_pretrained(image)
    return text, image
