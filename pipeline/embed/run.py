"""The embed job's driver: build the Ray Data flow, commit shards as they complete, report progress and a summary.

shards -> read_shards (CPU) -> preprocess (CPU) -> Encoder actors (GPU/CPU) -> write_parts (CPU) -> driver commits
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import ray
from ray.data import ActorPoolStrategy

from pipeline.config import AUTO_ACTORS, JobCfg, actor_range, resolve_actors
from pipeline.embed.encode import KEEP_FREED_MEMORY_ENV, Encoder
from pipeline.embed.plan import EmbedPlan, plan_embed_run, take_over_output
from pipeline.embed.preprocess import preprocess
from pipeline.embed.read import read_shards
from pipeline.embed.write import commit_shard, staging_dir, write_parts
from pipeline.io import storage
from pipeline.io.schema import file_metadata
from pipeline.io.shards import Shard
from pipeline.progress import ProgressReport, ProgressTicker, SteadyClock

log = logging.getLogger(__name__)

# a truncated shard keeps the samples before the cut: it is committed, and reported
COMMITTABLE_SHARD_ERRORS = ("shard_truncated",)


def ray_resources(cfg: JobCfg) -> dict:
    """The one place where config becomes Ray resources, for each stage of the flow."""
    min_actors, max_actors = actor_range(cfg.encoder.actors)
    in_flight = cfg.encoder.batches_in_flight
    pool = ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                             # batches in flight run in threads of the actor, each on its own CUDA stream
                             max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=in_flight > 1)
    # Ray Data fuses a task stage into the next actor stage whenever both have the same remote args: the
    # actors would then decode on the encoders' cores, one batch at a time. max_calls=0 is Ray's default for
    # CPU tasks (workers are reused without limit), stated explicitly so that the read stage's args differ
    read = dict(num_cpus=cfg.read.num_cpus, max_calls=0)
    encode = dict(num_cpus=cfg.encoder.num_cpus, num_gpus=cfg.encoder.num_gpus, compute=pool,
                  batch_size=cfg.encoder.batch_size)
    if cfg.encoder.num_gpus == 0:  # CPU towers: freed activations stay in the heap from the actor's start
        encode["runtime_env"] = {"env_vars": KEEP_FREED_MEMORY_ENV}
    if cfg.encoder.memory_gib is not None:
        encode["memory"] = int(cfg.encoder.memory_gib * 2**30)
    if cfg.read.node_labels:
        read["label_selector"] = dict(cfg.read.node_labels)
    if cfg.encoder.node_labels:
        encode["label_selector"] = dict(cfg.encoder.node_labels)
    return {"read": read, "encode": encode, "write": dict(num_cpus=cfg.write.num_cpus)}


def pool_for_input(cfg: JobCfg, shards: int) -> JobCfg:
    """No more encoder actors waited for than there are shards: a shard's first block is the most an actor
    is sure to get, and an actor that never gets a batch only loads weights (Ray Data warns about it too).
    The pool may still grow to its maximum when the shards' blocks keep more actors busy."""
    low, high = actor_range(cfg.encoder.actors)
    if shards >= low:
        return cfg
    log.info("encoder pool: %d..%d actors for %d shards (encoder.actors=%s)", max(1, shards), high, shards,
             cfg.encoder.actors)
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, actors=f"{max(1, shards)}..{high}"))


def dry_run_report(cfg: JobCfg, plan: EmbedPlan, shown: int = 5) -> dict:
    """What a run would do, from the plan alone (no Ray, nothing written): the shards, what is committed, the
    model and the resources each stage would ask Ray for."""
    stages = {"read": {"num_cpus": cfg.read.num_cpus, "label_selector": dict(cfg.read.node_labels) or None},
              "encode": {"actors": cfg.encoder.actors if cfg.encoder.actors != AUTO_ACTORS else
                         "auto: one per GPU (or CPU) of the Ray cluster, sized when the run starts",
                         "num_cpus": cfg.encoder.num_cpus, "num_gpus": cfg.encoder.num_gpus,
                         "memory_gib": cfg.encoder.memory_gib, "batch_size": cfg.encoder.batch_size,
                         "label_selector": dict(cfg.encoder.node_labels) or None},
              "write": {"num_cpus": cfg.write.num_cpus}}
    if cfg.encoder.actors != AUTO_ACTORS and plan.todo:
        stages["encode"]["actors"] = pool_for_input(cfg, len(plan.todo)).encoder.actors
    todo = plan.todo
    return {"shards_in_input": len(plan.shards), "first_shards": [s.url for s in plan.shards[:shown]],
            "already_committed": len(plan.shards) - len(todo), "to_embed": len(todo),
            "random_weights": plan.random_weights, "output_settings": plan.settings,
            "replaces_other_settings": list(plan.replaced), "ray_resources": stages}


def build_dataset(cfg: JobCfg, shards: list[Shard], run_id: str, random_weights: bool,
                  tokenizer: tuple[str, str | None]) -> ray.data.Dataset:
    ds = embedding_dataset(cfg, [s.url for s in shards], random_weights, tokenizer)
    return ds.map_batches(write_parts, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"cfg": cfg, "run_id": run_id}, **ray_resources(cfg)["write"])


def embedding_dataset(cfg: JobCfg, urls: list[str], random_weights: bool, tokenizer: tuple[str, str | None],
                      read_stage=None, texts: bool = True) -> ray.data.Dataset:
    """Shard URLs -> read + preprocess (CPU tasks) -> the Encoder pool: the flow up to the embedding rows.
    The evaluation job sends its images through it too, with its own read stage and `texts=False`."""
    resources = ray_resources(pool_for_input(cfg, len(urls)))
    ray.data.DataContext.get_current().wait_for_min_actors_s = cfg.encoder.wait_for_actors_s
    # one shard per block, so shards are read in parallel and a failed read retries one shard
    ds = ray.data.from_items([{"shard": url} for url in urls], override_num_blocks=len(urls))
    ds = ds.map_batches(read_stage or read_and_preprocess, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"cfg": cfg, "tokenizer": tokenizer}, **resources["read"])
    return ds.map_batches(Encoder, batch_format="pyarrow", fn_constructor_kwargs={
        "cfg": cfg, "random_weights": random_weights, "texts": texts}, **resources["encode"])


def read_and_preprocess(batch, cfg: JobCfg, tokenizer: tuple[str, str | None]):
    """The CPU stage: shard URLs in, decoded and tokenized sample blocks out."""
    for raw in read_shards(batch, cfg):
        yield preprocess(raw, cfg, tokenizer)


@dataclass
class ShardProgress:
    url: str
    parts: list[str] = field(default_factory=list)
    positions: set[int] = field(default_factory=set)
    expected: int | None = None
    shard_error: str | None = None

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.positions) >= self.expected

    @property
    def committable(self) -> bool:
        return self.shard_error is None or self.shard_error.startswith(COMMITTABLE_SHARD_ERRORS)


def take_row(shard: ShardProgress, row: dict, clock: SteadyClock) -> int:
    """One output row of the flow: a written part (new samples are counted once; a part holding only samples
    already written, a retried task's copy, is not used) or the shard's marker with its sample count.
    Returns the number of new samples."""
    if row["part"] is None:
        shard.expected, shard.shard_error = row["shard_samples"], row["shard_error"]
        return 0
    new = set(row["positions"]) - shard.positions
    if new:
        shard.parts.append(row["part"])
        shard.positions |= new
        clock.add(row["encoder"], row["encode_started"], row["encoded_at"], len(new))
    return len(new)


def run_embed_job(cfg: JobCfg, plan: EmbedPlan | None = None) -> dict:
    """Embed every uncommitted shard of cfg.input into cfg.output; return the run summary. `plan` is what
    plan_embed_run decided before Ray started (made here when not given)."""
    started = time.time()
    plan = plan or plan_embed_run(cfg)
    cfg = resolve_actors(cfg, ray.cluster_resources())
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    shards, todo = plan.shards, plan.todo
    if todo:  # sized once here: the flow and the progress line see the same pool
        cfg = pool_for_input(cfg, len(todo))
    log.info("run %s: %d shards in input, %d already committed (skipped), %d to embed",
             run_id, len(shards), len(shards) - len(todo), len(todo))
    take_over_output(cfg, plan)
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    stale = staging_dir(cfg)
    if fs.exists(stale):
        if fs.find(stale):  # parts left by a run that died before committing: never read, only removed
            log.warning("removing staged parts of an earlier, interrupted run under %s", stale)
        fs.rm(stale, recursive=True)
    embeddings = storage.join(out, "embeddings")
    if storage.is_local(fs) and fs.exists(embeddings):
        for leftover in fs.glob(storage.join(embeddings, ".*.tmp")):
            log.warning("removing %s, a commit interrupted before its rename", leftover)
            fs.rm(leftover)

    random_weights, tokenizer = plan.random_weights, plan.tokenizer
    metadata = file_metadata(cfg, random_weights, tokenizer[0])
    progress = {s.url: ShardProgress(s.url) for s in todo}
    commits: dict[str, ray.ObjectRef] = {}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    # a commit is idempotent: one whose worker or node died is retried for as long as it takes, as Ray Data
    # retries its own tasks (an error the commit raises is not retried: it is reported)
    commit_task = ray.remote(num_cpus=cfg.write.num_cpus, max_retries=-1)(commit_shard)
    pipeline_started, samples_seen = time.time(), 0
    report = ProgressReport(len(todo), cfg.ray.progress_interval_s, pipeline_started,
                            encoders=actor_range(cfg.encoder.actors)[0] if todo else 0)
    clock, last_output = SteadyClock(), None

    def collect(block: bool) -> None:
        pending = list(commits.values())
        if not pending:
            return
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=None if block else 0)
        for url, ref in list(commits.items()):
            if ref in ready:
                del commits[url]
                try:
                    results[url] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a failed commit is reported, the shard stays uncommitted
                    failed[url] = f"commit_failed: {exc}"

    if todo:
        ds = build_dataset(cfg, todo, run_id, random_weights, tokenizer)
        ticker = ProgressTicker(report, lambda: (len(results), len(failed), samples_seen, clock.encoders()),
                                lambda line: log.info("%s", line))
        with ticker:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                last_output = time.time()
                for row in batch.to_pylist():
                    shard = progress[row["shard"]]
                    samples_seen += take_row(shard, row, clock)
                    if shard.complete and shard.url not in commits and shard.url not in results:
                        if shard.committable:
                            commits[shard.url] = commit_task.remote(cfg, run_id, shard.url, shard.parts,
                                                                    shard.expected, metadata)
                        else:
                            failed[shard.url] = shard.shard_error
                collect(block=False)
        collect(block=True)
        log.info("%s", report.line(len(results), len(failed), samples_seen, clock.encoders(), now=time.time()))
        if fs.exists(staging_dir(cfg, run_id)):
            fs.rm(staging_dir(cfg, run_id), recursive=True)
        if storage.is_local(fs):  # the then empty _staging folder too (object stores have no empty folders)
            with contextlib.suppress(OSError):
                fs.rmdir(staging_dir(cfg))
        for shard in progress.values():
            if shard.url not in results and shard.url not in failed:
                failed[shard.url] = (shard.shard_error or
                                     f"incomplete: {len(shard.positions)} of {shard.expected} samples written")

    summary = summarize(cfg, run_id, started, pipeline_started, shards, todo, results, failed, progress,
                        random_weights)
    summary["output_settings"] = plan.settings  # what every table of the output was made with
    # which encoder actor, on which node, embedded how many of the pairs written (first copies only)
    summary["pairs_by_encoder"] = [{"node": name.rpartition(":")[0], "encoder": name.rpartition(":")[2], "pairs": n}
                                   for name, n in sorted(clock.pairs_by_encoder().items())]
    steady = clock.steady_rate(last_output) if last_output else None
    if steady:
        summary["startup_s"] = round(clock.window_start() - started, 3)
        summary["steady_pairs_per_s"] = round(steady, 3)
        summary["steady_window"] = [clock.window_start(), last_output]  # epoch seconds
    write_summary(cfg, summary)
    return summary


def summarize(cfg, run_id, started, pipeline_started, shards, todo, results, failed, progress, random_weights):
    finished = time.time()
    totals = collections.Counter()
    reasons = collections.Counter()
    for counts in results.values():
        totals.update({k: counts[k] for k in ("rows", "ok", "error")})
        reasons.update(counts["errors_by_reason"])
    embed_s = finished - (pipeline_started or finished)
    return {
        "run_id": run_id,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "wall_s": round(finished - started, 3),
        "shards_in_input": len(shards),
        "shards_skipped_already_committed": len(shards) - len(todo),
        "shards_committed": len(results),
        "shards_failed": len(failed),
        "samples": totals["rows"],
        "ok": totals["ok"],
        "error": totals["error"],
        "errors_by_reason": dict(reasons),
        "pairs_per_s": round(totals["rows"] / (finished - started), 2) if finished > started else None,
        "pairs_per_s_after_ray_start": round(totals["rows"] / embed_s, 2) if embed_s > 0 else None,
        "random_weights": random_weights,
        "failed_shards": {url: reason for url, reason in sorted(failed.items())},
        "truncated_shards": {url: p.shard_error for url, p in progress.items()
                             if url in results and p.shard_error},
        "shards": {url: results[url] for url in sorted(results)},
        "config": cfg.to_dict(),
    }


def write_summary(cfg: JobCfg, summary: dict) -> None:
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    path = storage.join(out, "_runs", f"{summary['run_id']}.json")
    storage.write_atomically(fs, path, json.dumps(summary, indent=2, ensure_ascii=False).encode())
    log.info("summary written to %s", storage.unstrip(fs, path))


# A local Ray keeps an idle worker for a minute, not a second. Its raylet keeps as many idle workers as it has
# unreserved CPUs; on a small machine whose cores the encoder actors reserve, that is 0-1, so the write and
# commit tasks of every batch found their workers gone and booted new ones (~2 s of CPU each, taken from the
# encoders: measured 9-15 worker starts per 512-pair demo run on 2 cores, and the runs with more were ~7%
# slower). An idle worker costs ~0.01 of a core. And no metrics are recorded: a local Ray without a dashboard
# has nothing that reads them, and recording them cost an idle local Ray ~0.02 of a core (0.105 -> 0.087, two
# runs each, Ray Data's helper actors up). A cluster's raylets keep their own settings (`ray start`).
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000, "enable_metrics_collection": False}


def schedule_as_batch_job() -> None:
    """Put this thread, and every process started from it from now on, under Linux's SCHED_BATCH policy.

    Called right before a local Ray starts: its GCS, raylet and (through the raylet) every worker inherit
    the policy. Nice values stay as they are. What changes: a process of the job that wakes up no longer
    preempts the one running; it runs at the next scheduler tick.

    Why: an idle Ray process wakes ~100-150 times a second (its core worker's 10 ms signal check; Ray Data's
    driver polls its output every 10 ms). On a small machine every wake preempted an encoder, which then went
    on from cold caches. Measured on 2 cores, per encoder in the steady window: ~470 preemptions a second
    before, ~250 with the policy, and 6% more pairs per CPU-second (BENCHMARKS.md, "Batch scheduling").

    Other programs on the machine still preempt the job. A cluster's processes keep the policy they were
    started with (`ray start`). No-op off Linux, or where a sandbox forbids it."""
    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        log.info("local Ray keeps the default scheduling policy: %s", exc)


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to `address` (or RAY_ADDRESS, which `ray job submit` sets), else start a local Ray with
    `num_cpus`; every job (embed, filter, eval, benchmark) starts Ray here."""
    from ray.data import DataContext

    if not sys.stderr.isatty():  # workers' lines reach a log file or a pipe: no ANSI colour codes in them
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        schedule_as_batch_job()
        ray.init(num_cpus=num_cpus, include_dashboard=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines; bars flood job logs
    ctx.max_errored_blocks = 0         # per-sample errors are rows: a failed block is a bug, never skipped
