"""Object storage: shards read from and embeddings committed to a real S3-protocol server on localhost."""

import io
import json

import pyarrow.parquet as pq
import pytest

from conftest import job_config, make_shards
from pipeline.embed.run import run_embed_job
from pipeline.io.storage import StorageError
from s3_server import SECRET, FlakyProxy, all_objects, moto_server, new_bucket, upload_folder


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ray_with_s3(s3):
    """A local Ray started after the AWS variables are set: its workers get credentials the way a
    cluster's nodes do, from their environment (never from the config)."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=2, include_dashboard=False)
    DataContext.get_current().enable_progress_bars = False
    yield s3
    ray.shutdown()


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3-shards")
    make_shards(folder, 3, 5)
    return folder


def test_embed_from_s3_to_s3(ray_with_s3, tiny_models, shard_folder):
    endpoint = ray_with_s3
    bucket = new_bucket(endpoint)
    upload_folder(endpoint, bucket, shard_folder, "wukong")
    cfg = job_config(tiny_models, f"s3://{bucket}/wukong/{{00000..00002}}.tar", f"s3://{bucket}/emb/",
                     f"storage.endpoint_url={endpoint}")
    summary = run_embed_job(cfg)
    assert summary["shards_committed"] == 3 and summary["samples"] == 15 and summary["ok"] == 15

    objects = all_objects(endpoint, bucket)
    committed = sorted(k for k in objects if k.startswith("emb/embeddings/"))
    assert committed == [f"emb/embeddings/0000{i}.parquet" for i in range(3)]
    assert not [k for k in objects if k.startswith("emb/_staging/")]
    table = pq.read_table(io.BytesIO(objects["emb/embeddings/00001.parquet"]))
    assert table.column("shard").to_pylist() == [f"s3://{bucket}/wukong/00001.tar"] * 5
    assert table.column("key").to_pylist() == [f"00001{i:04d}" for i in range(5)]
    (run_key,) = [k for k in objects if k.startswith("emb/_runs/") and k.endswith(".json")]
    assert json.loads(objects[run_key])["shards_committed"] == 3

    # scheduled rerun: only the new shard is embedded
    make_shards(shard_folder / "new", 4, 1)
    upload_folder(endpoint, bucket, shard_folder / "new", "wukong")  # 00000..00003; 00003 is new
    again = run_embed_job(job_config(tiny_models, f"s3://{bucket}/wukong/*.tar", f"s3://{bucket}/emb",
                                     f"storage.endpoint_url={endpoint}"))
    assert again["shards_skipped_already_committed"] == 3 and again["shards_committed"] == 1

    for key, payload in all_objects(endpoint, bucket).items():
        assert SECRET.encode() not in payload, key


def test_persistent_errors_fail_early_naming_the_url(ray_with_s3, tiny_models, tmp_path):
    endpoint = ray_with_s3
    bucket = new_bucket(endpoint)
    with pytest.raises(StorageError, match=r"input: s3://no-such-bucket-x/wukong does not exist"):
        run_embed_job(job_config(tiny_models, "s3://no-such-bucket-x/wukong/{00000..00002}.tar",
                                 f"s3://{bucket}/emb", f"storage.endpoint_url={endpoint}"))
    make_shards(tmp_path, 1, 1)
    upload_folder(endpoint, bucket, tmp_path, "in")
    with pytest.raises(StorageError, match=r"output: s3://no-such-bucket-y/emb"):
        run_embed_job(job_config(tiny_models, f"s3://{bucket}/in/00000.tar", "s3://no-such-bucket-y/emb",
                                 f"storage.endpoint_url={endpoint}"))


# (fault, every, burst): of every `every` data requests a fault applies to, the last `burst` are broken; in one
# 3-shard run the faults hit the shard reads (GET), or the part writes and commits (PUT), several times
# (a burst of 2 for PUTs: aiohttp re-sends an idempotent request once when a reused connection was reset)
FAULTS = [("slowdown", 3, 1), ("reset_get", 3, 1), ("reset_put", 4, 2), ("stall", 4, 1)]


def run_through_faults(endpoint, tiny_models, tmp_path, fault, every, burst, max_attempts, read_attempts):
    """The job on 3 shards through a proxy that injects `fault`; returns (summary or the exception, proxy)."""
    bucket = new_bucket(endpoint)
    make_shards(tmp_path, 3, 5)
    upload_folder(endpoint, bucket, tmp_path, "wukong")
    with FlakyProxy(endpoint, every=every, fault=fault, stall_s=3, burst=burst) as proxy:
        cfg = job_config(tiny_models, f"s3://{bucket}/wukong/{{00000..00002}}.tar", f"s3://{bucket}/emb",
                         f"storage.endpoint_url={proxy.endpoint}", f"storage.max_attempts={max_attempts}",
                         f"read.attempts={read_attempts}", "storage.timeout_s=1")
        try:
            outcome = run_embed_job(cfg)
        except Exception as exc:  # noqa: BLE001 - the run without retries may end any way but a complete one
            outcome = exc
    return bucket, outcome, proxy


@pytest.mark.parametrize("fault,every,burst", FAULTS)
def test_storage_faults_are_recovered_by_retries(ray_with_s3, tiny_models, tmp_path, fault, every, burst):
    """503 SlowDown, connections reset in the middle of a GET and of a PUT, responses stalled past
    storage.timeout_s: the default retries (storage.max_attempts=10, read.attempts=3) absorb them; nothing is
    lost or written twice."""
    endpoint = ray_with_s3
    bucket, summary, proxy = run_through_faults(endpoint, tiny_models, tmp_path, fault, every, burst,
                                                max_attempts=10, read_attempts=3)
    assert proxy.injected >= 3, proxy.injected
    assert isinstance(summary, dict), summary
    assert summary["shards_committed"] == 3 and summary["shards_failed"] == 0, summary["failed_shards"]
    assert summary["samples"] == 15 and summary["ok"] == 15
    objects = all_objects(endpoint, bucket)
    assert sorted(k for k in objects if k.startswith("emb/embeddings/")) == [
        f"emb/embeddings/0000{i}.parquet" for i in range(3)]
    for i in range(3):
        table = pq.read_table(io.BytesIO(objects[f"emb/embeddings/0000{i}.parquet"]))
        assert table.column("key").to_pylist() == [f"0000{i}{j:04d}" for j in range(5)]
    assert not [k for k in objects if k.startswith("emb/_staging/")]


@pytest.mark.parametrize("fault,every,burst", FAULTS)
def test_without_retries_the_same_faults_break_the_run(ray_with_s3, tiny_models, tmp_path, fault, every, burst):
    """The same faults with storage.max_attempts=1 and read.attempts=1: the run is not complete. So the
    faults are real, and the settings are what recovers from them (not some retry the test cannot see)."""
    _, outcome, proxy = run_through_faults(ray_with_s3, tiny_models, tmp_path, fault, every, burst,
                                           max_attempts=1, read_attempts=1)
    assert proxy.injected >= 1
    complete = isinstance(outcome, dict) and outcome["shards_committed"] == 3 and outcome["ok"] == 15
    assert not complete, f"{fault}: every shard committed without a single retry; broken: {proxy.broken}"


@pytest.mark.parametrize("fault,where", [("deny_all", "input: access denied listing"),
                                         ("deny_write", "output: access denied writing")])
def test_denied_access_fails_before_any_work_naming_the_url(s3, tiny_models, tmp_path, fault, where):
    """Credentials without access (S3 answers 403 AccessDenied): the job command exits 2 with one line that
    names the URL, before Ray starts; nothing is written."""
    import subprocess
    import sys
    from pathlib import Path

    bucket = new_bucket(s3)
    make_shards(tmp_path, 1, 2)
    upload_folder(s3, bucket, tmp_path, "wukong")
    text, image = tiny_models
    with FlakyProxy(s3, every=1, fault=fault) as proxy:
        result = subprocess.run(
            [sys.executable, "jobs/embed_wukong.py", "--config", "configs/demo.yaml",
             "--set", f"input=s3://{bucket}/wukong/00000.tar", "--set", f"output=s3://{bucket}/emb/",
             "--set", f"model.text={text}", "--set", f"model.image={image}", "--set", "make_demo_shards=false",
             "--set", f"storage.endpoint_url={proxy.endpoint}", "--set", "storage.max_attempts=2"],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    url = f"s3://{bucket}/wukong" if fault == "deny_all" else f"s3://{bucket}/emb/"  # the input's folder is listed
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("storage error: ")]
    assert line.startswith(f"storage error: {where} {url}: ") and "Access Denied" in line, line
    assert "Traceback" not in result.stderr and "ray.init" not in result.stderr.lower()
    assert proxy.injected >= 1
    assert sorted(all_objects(s3, bucket)) == ["wukong/00000.tar"]  # nothing written
