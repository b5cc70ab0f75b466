"""The embed job end to end on a 2-CPU local Ray: the output contract, per-shard commits, reruns."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config, make_shards, sample_members
from pipeline.embed.demo import write_tar_shard
from pipeline.embed.run import run_embed_job
from pipeline.io.schema import read_metadata

CONTRACT = [("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()), ("url", pa.string()),
            ("status", pa.string()), ("error", pa.string()),
            ("image_embedding", pa.list_(pa.float16(), 512)), ("text_embedding", pa.list_(pa.float16(), 512)),
            ("similarity", pa.float32())]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    paths = make_shards(folder, n_shards=3, per_shard=6)
    # shard 00003: bad samples beside good ones
    members = (sample_members("bad0", "好的样本", 100) + [("bad1.jpg", b"garbage"), ("bad1.txt", "坏图".encode())]
               + sample_members("bad2", None, 101) + sample_members("bad3", "另一个好样本", 102))
    write_tar_shard(folder / "00003.tar", members)
    return folder, paths + [folder / "00003.tar"]


def read_output(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "embeddings").glob("*.parquet")))


def test_output_contract(local_ray, tiny_models, shards, tmp_path):
    folder, paths = shards
    out = tmp_path / "out"
    summary = run_embed_job(job_config(tiny_models, f"{folder}/{{00000..00003}}.tar", str(out)))
    assert summary["shards_committed"] == 4 and summary["shards_failed"] == 0
    assert (summary["samples"], summary["ok"], summary["error"]) == (22, 20, 2)

    files = sorted(p.name for p in (out / "embeddings").iterdir())
    assert files == ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    for path in (out / "embeddings").iterdir():
        table = pq.read_table(path)  # plain pyarrow, no Ray
        assert [(f.name, f.type) for f in table.schema][: len(CONTRACT)] == CONTRACT
        meta = read_metadata(table.schema)
        assert meta["random_weights"] is False and meta["text_model"] == str(tiny_models[0])
        assert table.column("position").to_pylist() == list(range(table.num_rows))
        assert set(table.column("shard").to_pylist()) == {str(folder / path.name.replace(".parquet", ".tar"))}

    table = read_output(out)
    expected_keys = {f"{s:05d}{i:04d}" for s in range(3) for i in range(6)} | {"bad0", "bad1", "bad2", "bad3"}
    assert sorted(table.column("key").to_pylist()) == sorted(expected_keys)  # each exactly once
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["bad1"]["status"] == "error" and rows["bad1"]["error"].startswith("image_decode_failed")
    assert rows["bad2"]["status"] == "error" and rows["bad2"]["error"].startswith("missing_caption")
    for key in ("bad1", "bad2"):
        assert rows[key]["image_embedding"] is None and rows[key]["similarity"] is None
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    assert ok.num_rows == 20 and ok.column("error").null_count == 20
    image = np.array(ok.column("image_embedding").to_pylist(), np.float32)
    text = np.array(ok.column("text_embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)
    np.testing.assert_allclose((image * text).sum(1), ok.column("similarity").to_numpy(), atol=2e-3)
    assert rows["000000000"]["url"] == "https://example.com/000000000.jpg"
    assert rows["000000000"]["caption"] == "一只猫坐在窗台上"

    (summary_file,) = (out / "_runs").glob("*.json")
    written = json.loads(summary_file.read_text())
    assert written["shards"][str(folder / "00003.tar")] == {
        "rows": 4, "ok": 2, "error": 2, "errors_by_reason": {"image_decode_failed": 1, "missing_caption": 1}}
    assert written["config"]["model"]["text"] == str(tiny_models[0])
    assert not (out / "_staging").exists()  # a clean run leaves nothing the next could take for a crash

    # a rerun skips what is committed, and picks up a new shard only
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    make_shards(tmp_path / "more", 1, 3)
    (tmp_path / "more" / "00000.tar").rename(folder / "00004.tar")
    again = run_embed_job(job_config(tiny_models, f"{folder}/{{00000..00004}}.tar", str(out)))
    assert again["shards_skipped_already_committed"] == 4 and again["shards_committed"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir() if p.name in before} == before
    assert read_output(out).num_rows == 25

    # overwrite=true recomputes (the two files are written again), to the same numbers
    recomputed = {"00000.parquet", "00001.parquet"}
    tables_before = {name: pq.read_table(out / "embeddings" / name) for name in recomputed}
    written_before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    third = run_embed_job(job_config(tiny_models, f"{folder}/0000[0-1].tar", str(out), "overwrite=true"))
    assert third["shards_committed"] == 2 and third["shards_skipped_already_committed"] == 0
    written_after = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert {n for n in written_after if written_after[n] != written_before[n]} == recomputed
    for name in recomputed:
        assert pq.read_table(out / "embeddings" / name).equals(tables_before[name]), name
    assert pq.read_table(out / "embeddings" / "00000.parquet").column("similarity").equals(
        table.filter(pa.compute.equal(table.column("shard"), str(folder / "00000.tar"))).column("similarity"))


def test_float32_embeddings_for_spark(local_ray, tiny_models, shards, tmp_path):
    folder, _ = shards
    out = tmp_path / "out32"
    run_embed_job(job_config(tiny_models, str(folder / "00001.tar"), str(out), "write.embedding_dtype=float32"))
    table = pq.read_table(out / "embeddings" / "00001.parquet")
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32(), 512)
    assert table.schema.field("text_embedding").type == pa.list_(pa.float32(), 512)


def test_failed_shards_are_reported_and_not_committed(local_ray, tiny_models, shards, tmp_path):
    folder, _ = shards
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    out = tmp_path / "out"
    summary = run_embed_job(job_config(
        tiny_models, f"{{{folder}/00002.tar,{tmp_path}/junk.tar,{tmp_path}/missing.tar}}", str(out)))
    assert summary["shards_committed"] == 1 and summary["shards_failed"] == 2
    assert summary["failed_shards"][str(tmp_path / "junk.tar")].startswith("shard_unreadable")
    assert summary["failed_shards"][str(tmp_path / "missing.tar")].startswith("shard_missing")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["00002.parquet"]


def test_decode_on_encoder_keeps_the_contract(local_ray, tiny_models, shards, tmp_path, caplog):
    """read.decode_on=encoder: the same files, keys, statuses and text embeddings; image embeddings within the
    resize kernel's difference (tiny wide-init towers amplify a 1-level pixel change to ~1e-2)."""
    folder, _ = shards
    inputs = f"{folder}/{{00000..00003}}.tar"
    run_embed_job(job_config(tiny_models, inputs, str(tmp_path / "tasks")))
    with caplog.at_level(logging.INFO, logger="pipeline.embed.run"):
        summary = run_embed_job(job_config(tiny_models, inputs, str(tmp_path / "encoder"), "read.decode_on=encoder",
                                           "encoder.batches_in_flight=2", "ray.progress_interval_s=0.5"))
    import ray._private.state  # the GCS's actor table: this module's Ray runs without the dashboard

    # read tasks and actors ask for the same 0.5 CPU here, yet decoding never fuses into the encoder actors
    encoders = [a["ActorClassName"] for a in ray._private.state.actors().values() if "Encoder" in a["ActorClassName"]]
    assert encoders and not any("read_and_preprocess" in name for name in encoders), encoders
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert progress and all(" shards committed (" in line and "% done)" in line for line in progress)
    assert summary["shards_committed"] == 4 and (summary["ok"], summary["error"]) == (20, 2)
    exact, on_encoder = read_output(tmp_path / "tasks"), read_output(tmp_path / "encoder")
    assert on_encoder.schema.equals(exact.schema, check_metadata=False)
    for column in ("key", "shard", "position", "caption", "url", "status", "error", "warning", "text_embedding"):
        assert on_encoder.column(column).equals(exact.column(column)), column
    ok = pa.compute.equal(exact.column("status"), "ok")
    a = np.array(exact.filter(ok).column("image_embedding").to_pylist(), np.float32)
    b = np.array(on_encoder.filter(ok).column("image_embedding").to_pylist(), np.float32)
    assert (a * b).sum(1).min() > 0.99


def test_two_batches_in_flight_run_at_once_on_one_actor(local_ray, tiny_models, shards, tmp_path):
    """encoder.batches_in_flight=2: one encoder actor runs two batches at the same time (the rows of each batch
    carry its actor and when it started and ended: two batches of one actor overlap in time)."""
    from pipeline.embed.plan import plan_embed_run
    from pipeline.embed.run import embedding_dataset

    folder, _ = shards
    cfg = job_config(tiny_models, f"{folder}/{{00000..00003}}.tar", str(tmp_path / "out"), "encoder.batch_size=2",
                     "read.batch_size=2", "encoder.batches_in_flight=2")
    plan = plan_embed_run(cfg)
    ds = embedding_dataset(cfg, [s.url for s in plan.shards], plan.random_weights, plan.tokenizer)
    batches = {}
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in block.select(["encoder", "encode_started", "encoded_at"]).to_pylist():
            batches[(row["encoder"], row["encode_started"])] = row["encoded_at"]
    assert len({encoder for encoder, _ in batches}) == 1 and len(batches) >= 8, batches
    spans = sorted((started, ended) for (_, started), ended in batches.items())
    overlaps = sum(later_start < ended for (_, ended), (later_start, _) in zip(spans, spans[1:]))
    assert overlaps >= 1, spans


BATCH_POLICY_CHECK = """
import os
import psutil, ray
from pipeline.embed.run import init_ray

before = os.sched_getscheduler(0)
init_ray(None, 1)
worker = ray.get(ray.remote(num_cpus=0)(lambda: os.sched_getscheduler(0)).remote())
raylet = next(p for p in psutil.Process().children(recursive=True) if "raylet" in p.name())
print(before == os.SCHED_OTHER, worker == os.SCHED_BATCH, os.sched_getscheduler(raylet.pid) == os.SCHED_BATCH)
"""


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux scheduling policies")
def test_a_local_ray_runs_under_the_batch_policy(tmp_path):
    """A job that starts its own Ray (the demo) puts it under SCHED_BATCH: the raylet and its workers inherit it
    (BENCHMARKS.md, "Batch scheduling"). In a child process: the policy would otherwise stay on pytest's thread."""
    result = subprocess.run([sys.executable, "-c", BATCH_POLICY_CHECK], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["True", "True", "True"], result.stdout
