"""The embed job's stages driven without Ray, for the benchmark on a machine that has no Ray (the lent GPU box).

Read + tokenize (+ decode, with read.decode_on=tasks) run in a pool of worker processes, the Encoder in this
process with encoder.batches_in_flight threads: the job's own stage functions (read.read_shards,
preprocess.preprocess, encode.Encoder), without Ray's object store, scheduling or the Parquet commit protocol.
Figures measured this way are labelled "without Ray".
"""

from __future__ import annotations

import collections
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobCfg
from pipeline.embed.preprocess import preprocess
from pipeline.progress import SteadyClock
from pipeline.embed.read import read_shards


def read_workers(cfg: JobCfg) -> int:
    """Worker processes for read + preprocess: the cores left once the encoder has its reservation."""
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    return max(1, int((cores - cfg.encoder.num_cpus) // max(cfg.read.num_cpus, 0.01)))


def prepare_shard(url: str, cfg: JobCfg, tokenizer: tuple[str, str | None]) -> pa.Table:
    """One shard's sample rows, decoded (or not, decode_on=encoder) and tokenized; marker rows dropped."""
    blocks = [preprocess(raw, cfg, tokenizer) for raw in read_shards(pa.table({"shard": [url]}), cfg)]
    table = pa.concat_tables(blocks)
    return table.filter(pc.greater_equal(table.column("position"), 0))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_without_ray(cfg: JobCfg, shard_urls: list[str], random_weights: bool, tokenizer: tuple[str, str | None],
                    out: Path) -> dict:
    """Embed every sample of `shard_urls`, writing one Parquet file per encoder batch under `out`."""
    from pipeline.embed.encode import Encoder

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    workers = read_workers(cfg)
    # spawned, not forked: this process is about to hold a CUDA context
    readers = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread)
    encoder = Encoder(cfg, random_weights)
    in_flight = cfg.encoder.batches_in_flight
    clock, counts = SteadyClock(), collections.Counter()
    todo, reading, buffered, encoding = collections.deque(shard_urls), set(), [], collections.deque()

    def finish(future) -> None:
        table = future.result()
        counts["pairs"] += table.num_rows
        counts["ok"] += pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
        clock.add(table["encoder"][0].as_py(), table["encode_started"][0].as_py(), table["encoded_at"][0].as_py(),
                  table.num_rows)
        pq.write_table(table.drop_columns(["encoder", "encode_started", "encoded_at"]),
                       out / f"part-{counts['parts']:06d}.parquet", compression=cfg.write.compression)
        counts["parts"] += 1

    def encode(batch: pa.Table) -> None:
        while len(encoding) >= in_flight:  # back-pressure: one batch queued behind those running
            finish(encoding.popleft())
        encoding.append(threads.submit(encoder, batch))

    with readers, ThreadPoolExecutor(in_flight) as threads:
        while todo or reading:
            while todo and len(reading) < 2 * workers:  # bounded read-ahead
                reading.add(readers.submit(prepare_shard, todo.popleft(), cfg, tokenizer))
            done, reading = wait(reading, return_when=FIRST_COMPLETED, timeout=0.05 if encoding else None)
            for future in done:
                buffered.append(future.result())
            rows = sum(t.num_rows for t in buffered)
            if rows >= cfg.encoder.batch_size or (not todo and not reading and rows):
                table = pa.concat_tables(buffered)
                for begin in range(0, table.num_rows, cfg.encoder.batch_size):
                    batch = table.slice(begin, cfg.encoder.batch_size)
                    if batch.num_rows == cfg.encoder.batch_size or (not todo and not reading):
                        encode(batch)
                    else:
                        buffered = [batch]
                        break
                else:
                    buffered = []
            while encoding and encoding[0].done():
                finish(encoding.popleft())
        while encoding:
            finish(encoding.popleft())
    finished = time.time()
    steady = clock.steady_rate(finished)
    decoder = encoder.decoder
    return {"pairs": counts["pairs"], "ok": counts["ok"], "wall_s": round(finished - started, 3),
            "startup_s": round(clock.window_start() - started, 3) if steady else None,
            "steady_pairs_per_s": round(steady, 3) if steady else None,
            "whole_run_pairs_per_s": round(counts["pairs"] / (finished - started), 2),
            "steady_window": [clock.window_start(), finished] if steady else None,
            "read_workers": workers, "ray": False,
            "decoded_on_device": decoder.on_device if decoder else 0,
            "decoded_on_cpu_in_encoder": decoder.on_cpu if decoder else 0}
