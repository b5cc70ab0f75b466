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


def test_slowdown_503s_are_retried(ray_with_s3, tiny_models, tmp_path):
    """S3 answers 503 SlowDown under load: the storage clients' retries absorb them (botocore's standard
    mode with storage.max_attempts, and s3fs's own, which alone already suffice for this rate), with the
    reader's shard-level retries switched off (read.attempts=1); nothing is lost or written twice."""
    endpoint = ray_with_s3
    bucket = new_bucket(endpoint)
    make_shards(tmp_path, 3, 5)
    upload_folder(endpoint, bucket, tmp_path, "wukong")
    with FlakyProxy(endpoint, every=3) as proxy:
        cfg = job_config(tiny_models, f"s3://{bucket}/wukong/{{00000..00002}}.tar", f"s3://{bucket}/emb",
                         f"storage.endpoint_url={proxy.endpoint}", "storage.max_attempts=5", "read.attempts=1")
        summary = run_embed_job(cfg)
    # a third of the job's requests (listing, reads, part writes, commits) failed
    assert proxy.requests >= 15 and proxy.injected == proxy.requests // 3
    assert summary["shards_committed"] == 3 and summary["shards_failed"] == 0, summary["failed_shards"]
    assert summary["samples"] == 15 and summary["ok"] == 15
    objects = all_objects(endpoint, bucket)
    for i in range(3):
        table = pq.read_table(io.BytesIO(objects[f"emb/embeddings/0000{i}.parquet"]))
        assert table.column("key").to_pylist() == [f"0000{i}{j:04d}" for j in range(5)]
