"""The embed job's stages driven without Ray, for the benchmark on a machine that has no Ray (the lent GPU box).

Read + tokenize (+ decode, with read.decode_on=tasks) run in a pool of worker processes; each encoder is a
process of its own (EncoderProcesses: spawned, with its own CUDA context and host thread, as a Ray actor is),
running encoder.batches_in_flight batches at once on threads: the job's own stage functions (read.read_shards,
preprocess.preprocess, encode.Encoder), without Ray's object store, scheduling or the Parquet commit protocol.
encoder.actors encoders share the machine's GPUs at encoder.num_gpus each (0.5: two per GPU). As with Ray's
shared-memory object store, the rows do not travel through this process: a read worker writes each prepared
shard as an Arrow file in shared memory (/dev/shm), an encoder maps the files its batch's rows are in
(zero-copy), and the driver only sends each encoder the (file, first row, rows) of its batch. Figures
measured this way are labelled "without Ray".
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import tempfile
import time
import traceback
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobCfg, actor_range, actors_per_gpu
from pipeline.embed.preprocess import preprocess
from pipeline.embed.read import read_shards
from pipeline.progress import SteadyClock


def read_workers(cfg: JobCfg) -> int:
    """Worker processes for read + preprocess: the cores left once the encoders have their reservations."""
    cores = cfg.ray.num_cpus or os.cpu_count() or 1
    return max(1, int((cores - encoder_count(cfg) * cfg.encoder.num_cpus) // max(cfg.read.num_cpus, 0.01)))


def encoder_count(cfg: JobCfg) -> int:
    """Encoder processes without Ray: encoder.actors, or the top of a range (nothing autoscales here)."""
    return actor_range(cfg.encoder.actors)[1]


def gpus_of(cfg: JobCfg, index: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for encoder `index`: encoder.num_gpus each, in order over this machine's GPUs (of
    those CUDA_VISIBLE_DEVICES names, if set), as Ray would assign them; None on CPU."""
    if cfg.encoder.num_gpus <= 0:
        return None
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(max(torch.cuda.device_count(), 1))]
    if cfg.encoder.num_gpus <= 1:
        return devices[(index // actors_per_gpu(cfg.encoder.num_gpus)) % len(devices)]
    per_actor = int(cfg.encoder.num_gpus)
    return ",".join(devices[(index * per_actor + i) % len(devices)] for i in range(per_actor))


def prepare_shard(url: str, cfg: JobCfg, tokenizer: tuple[str, str | None], spool: str) -> tuple[str, int]:
    """One shard's sample rows, decoded (or not, decode_on=encoder) and tokenized, marker rows dropped, written
    as an Arrow file under `spool`: (its path, its rows)."""
    blocks = [preprocess(raw, cfg, tokenizer) for raw in read_shards(pa.table({"shard": [url]}), cfg)]
    table = pa.concat_tables(blocks)
    table = table.filter(pc.greater_equal(table.column("position"), 0))
    path = os.path.join(spool, f"{uuid.uuid4().hex}.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path, table.num_rows


def mapped_rows(segments: list[tuple[str, int, int]]) -> pa.Table:
    """The rows (file, first row, rows) name, from the spooled files mapped in place (no copy)."""
    tables = []
    for path, first, rows in segments:
        with pa.memory_map(path) as source:
            tables.append(pa.ipc.open_file(source).read_all().slice(first, rows))
    return pa.concat_tables(tables)


def spool_folder(min_free: int = 4 * 2**30) -> str:
    """Shared memory where the machine has enough of it (a file there is memory, as in Ray's object store; a
    container's /dev/shm is often 64 MB), else the temp folder (the page cache holds it)."""
    shm = "/dev/shm"
    use_shm = os.path.isdir(shm) and shutil.disk_usage(shm).free >= min_free
    return tempfile.mkdtemp(prefix="taiyi-bench-", dir=shm if use_shm else None)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def serve_encoder(cfg: JobCfg, random_weights: bool, index: int, gpus: str | None, inbox, results) -> None:
    """An encoder process: loads the towers, says it is ready, then embeds the batches it is sent, up to
    encoder.batches_in_flight at once, until it is sent None. ("ceiling", ids, seconds, variant) times the towers
    alone (towers.time_towers)."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus  # before CUDA starts in this process
    try:
        from pipeline.bench.towers import time_towers
        from pipeline.embed.encode import Encoder

        started = time.perf_counter()
        encoder = Encoder(cfg, random_weights)
        results.put(("ready", index, round(time.perf_counter() - started, 3)))
        with ThreadPoolExecutor(cfg.encoder.batches_in_flight) as threads:
            def embed(seq: int, segments: list) -> None:
                try:
                    results.put(("embedded", index, (seq, encoder(mapped_rows(segments)))))
                except BaseException:  # noqa: BLE001 - the driver raises it
                    results.put(("failed", index, traceback.format_exc()))

            while (message := inbox.get()) is not None:
                if message[0] == "ceiling":
                    results.put(("ceiling", index, time_towers(encoder, *message[1:3], 3, message[3])))
                else:
                    threads.submit(embed, *message[1:])
        decoder = encoder.decoder
        results.put(("closed", index, {"decoded_on_device": decoder.on_device if decoder else 0,
                                       "decoded_on_cpu_in_encoder": decoder.on_cpu if decoder else 0}))
    except BaseException:  # noqa: BLE001
        results.put(("failed", index, traceback.format_exc()))


class EncoderProcesses:
    """encoder.actors encoder processes (spawned: each its own CUDA context), fed through pipes."""

    def __init__(self, cfg: JobCfg, random_weights: bool):
        context = get_context("spawn")
        self.results, self.count = context.Queue(), encoder_count(cfg)
        self.inboxes = [context.Queue() for _ in range(self.count)]
        self.processes = [context.Process(target=serve_encoder, daemon=True,
                                          args=(cfg, random_weights, i, gpus_of(cfg, i), inbox, self.results))
                          for i, inbox in enumerate(self.inboxes)]
        for process in self.processes:
            process.start()
        self.load_s = [self.receive("ready")[1] for _ in range(self.count)]  # every model loaded, as Ray's pool
        self.busy = [0] * self.count

    def receive(self, kind: str, timeout: float | None = None):
        """(encoder index, value) of the next message, which must be of `kind`; an encoder's failure raises."""
        while True:
            try:
                got, index, value = self.results.get(timeout=timeout if timeout is not None else 5.0)
            except queue.Empty:
                if timeout is not None:
                    return None
                dead = [p.pid for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"encoder processes {dead} died without a word (out of memory?)") from None
                continue
            if got == "failed":
                raise RuntimeError(f"encoder process {index} failed:\n{value}")
            if got != kind:
                raise RuntimeError(f"encoder process {index} said {got!r}, expected {kind!r}")
            return index, value

    def submit(self, seq: int, segments: list[tuple[str, int, int]]) -> None:
        """A batch, as the (file, first row, rows) it is made of, to the encoder with the fewest batches (at most
        batches_in_flight + 1 each: the caller waits)."""
        index = int(np.argmin(self.busy))
        self.busy[index] += 1
        self.inboxes[index].put(("batch", seq, segments))

    def ceiling(self, input_ids: np.ndarray, seconds: float, variant: str | None = None) -> list[dict]:
        """Each encoder's towers timed alone, all at once (`variant`: towers.VARIANTS)."""
        for inbox in self.inboxes:
            inbox.put(("ceiling", input_ids, seconds, variant))
        measured = dict(self.receive("ceiling") for _ in range(self.count))
        return [dict(measured[i], model_load_s=self.load_s[i]) for i in range(self.count)]

    def close(self) -> dict:
        """Stops the encoders; the sums of their decoders' counts (those that said them within a minute)."""
        for inbox in self.inboxes:
            inbox.put(None)
        counts, closed, deadline = collections.Counter(), 0, time.monotonic() + 60
        while closed < self.count and time.monotonic() < deadline:
            try:
                got, _, value = self.results.get(timeout=1.0)
            except queue.Empty:
                continue
            if got == "closed":
                counts.update(value)
                closed += 1
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        return dict(counts)


def run_without_ray(cfg: JobCfg, shard_urls: list[str], random_weights: bool, tokenizer: tuple[str, str | None],
                    out: Path) -> dict:
    """Embed every sample of `shard_urls`, writing one Parquet file per encoder batch under `out`."""
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    workers, spool = read_workers(cfg), spool_folder()
    # spawned, not forked: the encoder processes hold CUDA contexts
    readers = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread)
    clock, counts = SteadyClock(), collections.Counter()
    todo, reading = collections.deque(shard_urls), set()
    pending: collections.deque = collections.deque()  # (file, first row, rows) not yet in a batch
    batches: dict[int, list] = {}  # batch number -> its segments, until embedded
    users = collections.Counter()  # file -> batches in flight that read it
    size = cfg.encoder.batch_size

    def finish(encoder: int, seq: int, table: pa.Table) -> None:
        encoders.busy[encoder] -= 1
        for path, _, _ in batches.pop(seq):
            users[path] -= 1
            if not users[path] and not any(path == waiting[0] for waiting in pending):
                os.remove(path)  # every row of it embedded
                del users[path]
        counts["pairs"] += table.num_rows
        counts["ok"] += pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
        clock.add(table["encoder"][0].as_py(), table["encode_started"][0].as_py(), table["encoded_at"][0].as_py(),
                  table.num_rows)
        pq.write_table(table.drop_columns(["encoder", "encode_started", "encoded_at"]),
                       out / f"part-{counts['parts']:06d}.parquet", compression=cfg.write.compression)
        counts["parts"] += 1

    def collect(block: bool) -> None:
        while (got := encoders.receive("embedded", timeout=None if block else 0)) is not None:
            finish(got[0], *got[1])
            block = False

    def send(rows: int) -> None:
        """The next `rows` pending rows as one batch, to an encoder (back-pressure: one batch queued behind those
        running on each encoder)."""
        while min(encoders.busy) > cfg.encoder.batches_in_flight:
            collect(block=True)
        segments = []
        while rows:
            path, first, available = pending.popleft()
            take = min(rows, available)
            segments.append((path, first, take))
            if take < available:
                pending.appendleft((path, first + take, available - take))
            users[path] += 1
            rows -= take
        batches[counts["sent"]] = segments
        encoders.submit(counts["sent"], segments)
        counts["sent"] += 1

    with readers:
        encoders = EncoderProcesses(cfg, random_weights)
        try:
            loaded = time.time()
            while todo or reading:
                while todo and len(reading) < 2 * workers:  # bounded read-ahead
                    reading.add(readers.submit(prepare_shard, todo.popleft(), cfg, tokenizer, spool))
                done, reading = wait(reading, return_when=FIRST_COMPLETED, timeout=0.05 if any(encoders.busy) else None)
                for future in done:
                    path, rows = future.result()
                    if rows:
                        pending.append((path, 0, rows))
                    else:
                        os.remove(path)
                while sum(rows for _, _, rows in pending) >= size:
                    send(size)
                collect(block=False)
            if pending:  # the last, partial batch
                send(sum(rows for _, _, rows in pending))
            while any(encoders.busy):
                collect(block=True)
            finished = time.time()
        finally:
            decoded = encoders.close()
            shutil.rmtree(spool, ignore_errors=True)
    steady = clock.steady_rate(finished)
    return {"pairs": counts["pairs"], "ok": counts["ok"], "wall_s": round(finished - started, 3),
            "startup_s": round(clock.window_start() - started, 3) if steady else None,
            "models_loaded_s": round(loaded - started, 3),
            "steady_pairs_per_s": round(steady, 3) if steady else None,
            "whole_run_pairs_per_s": round(counts["pairs"] / (finished - started), 2),
            "steady_window": [clock.window_start(), finished] if steady else None,
            "read_workers": workers, "encoder_processes": encoders.count, "encoders_seen": clock.encoders(),
            "ray": False, **decoded}
