"""The flow users run: `ray start --head`, `ray job submit` of the embed job then the filter job, S3 in and out,
no leaked secrets."""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_shards
from s3_server import ACCESS_KEY, SECRET, all_objects, free_port, moto_server, new_bucket, upload_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on free ports, started with the AWS variables in its environment (as a cluster's
    nodes get them from an instance role or their env); its logs go to a folder of its own."""
    with moto_server() as endpoint:
        temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
        dashboard = free_port()
        subprocess.run(["ray", "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                        "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                        f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--disable-usage-stats",
                        f"--temp-dir={temp_dir}"], check=True, capture_output=True, timeout=120,
                       # loopback-only test head: no token auth (a real cluster keeps it; see README)
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        try:
            yield endpoint, f"http://127.0.0.1:{dashboard}", Path(temp_dir)
        finally:
            subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_s3_to_s3(ray_head, tiny_models, tmp_path):
    endpoint, address, temp_dir = ray_head
    bucket = new_bucket(endpoint)
    make_shards(tmp_path / "shards", 3, 4)
    upload_folder(endpoint, bucket, tmp_path / "shards", "wukong")
    text, image = tiny_models
    overrides = [
        f"input=s3://{bucket}/wukong/{{00000..00002}}.tar", f"output=s3://{bucket}/emb/",
        f"model.text={text}", f"model.image={image}", "model.random_init_fallback=false",
        "make_demo_shards=false", f"storage.endpoint_url={endpoint}", "read.num_cpus=0.5",
        "encoder.num_cpus=0.5", "encoder.torch_threads=1", "ray.num_cpus=null", "ray.progress_interval_s=1",
    ]
    # the submitting client holds no AWS secrets: only the cluster's nodes do
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "RAY_AUTH_MODE": "disabled"}
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/embed_wukong.py", "--config", "configs/demo.yaml",
         *[arg for o in overrides for arg in ("--set", o)]],
        capture_output=True, text=True, timeout=600, env=env)
    printed = submit.stdout + submit.stderr
    assert submit.returncode == 0, printed[-5000:]
    assert "succeeded" in printed.lower()
    assert '"shards_committed": 3' in printed and '"samples": 12' in printed
    assert '"endpoint_url": "http://127.0.0.1' in printed  # the resolved config was printed ...

    # the curation step of a scheduled run, submitted the same way: S3 embeddings in, S3 keep-lists out
    filtered = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/filter_pairs.py", "--config", "configs/filter.yaml",
         *[arg for o in (f"embeddings=s3://{bucket}/emb/", f"output=s3://{bucket}/filtered/",
                         f"storage.endpoint_url={endpoint}", "keep_top_fraction=0.5", "write_shards=true",
                         "report=false", "ray_num_cpus=null") for arg in ("--set", o)]],
        capture_output=True, text=True, timeout=600, env=env)
    printed += filtered.stdout + filtered.stderr
    assert filtered.returncode == 0, (filtered.stdout + filtered.stderr)[-5000:]
    assert '"ok": 12' in printed and '"kept": 6' in printed

    objects = all_objects(endpoint, bucket)
    assert json.loads(objects["filtered/summary.json"])["kept"] == 6
    kept = [pq.read_table(pa.BufferReader(objects[f"filtered/keep/0000{i}.parquet"])) for i in range(3)]
    assert sum(t.num_rows for t in kept) == 6
    assert sorted(k for k in objects if k.startswith("filtered/shards/")) == [
        f"filtered/shards/0000{i}.tar" for i in range(3)]
    tables = [pq.read_table(pa.BufferReader(objects[f"emb/embeddings/0000{i}.parquet"])) for i in range(3)]
    keys = sorted(k for t in tables for k in t.column("key").to_pylist())
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(3) for i in range(4))
    (summary_key,) = [k for k in objects if k.startswith("emb/_runs/")]
    assert json.loads(objects[summary_key])["ok"] == 12

    # ... and no credential value is anywhere: printed output, Ray's logs, Parquet metadata, any object
    for secret in (SECRET, ACCESS_KEY):
        assert secret not in printed
        for path in temp_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path
        for key, payload in objects.items():
            assert secret.encode() not in payload, key
        for table in tables:
            assert secret.encode() not in json.dumps(
                {k.decode(): v.decode() for k, v in table.schema.metadata.items()}).encode()
