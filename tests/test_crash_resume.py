"""Nothing lost, nothing twice: the driver or an encoder actor killed mid-run, then a rerun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_shards

REPO = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 8, 6
ALL_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(N_SHARDS) for i in range(PER_SHARD))


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash-shards")
    make_shards(folder, N_SHARDS, PER_SHARD)
    return folder


def write_config(tmp_path, tiny_models, shard_folder, out) -> Path:
    text, image = tiny_models
    config = {
        "input": f"{shard_folder}/{{00000..{N_SHARDS - 1:05d}}}.tar", "output": str(out),
        "model": {"text": str(text), "image": str(image)},
        # small batches: many parts and commits, so the kills land mid-run
        "read": {"batch_size": 2, "num_cpus": 0.5},
        "encoder": {"actors": 1, "num_cpus": 0.5, "batch_size": 2, "torch_threads": 1},
        "write": {"num_cpus": 0.25},
        "ray": {"num_cpus": 2, "progress_interval_s": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_job(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "jobs/embed_wukong.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until(condition, job: subprocess.Popen, timeout=180.0, poll=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if job.poll() is not None:
            pytest.fail(f"job ended before the kill point:\n{job.stdout.read()[-3000:]}")
        time.sleep(poll)
    pytest.fail("kill point never reached")


def staged_parts(out: Path) -> list[Path]:
    return list((out / "_staging").glob("*/*/*.parquet"))


def committed(out: Path) -> list[Path]:
    folder = out / "embeddings"
    return sorted(folder.glob("*.parquet")) if folder.exists() else []


def kill_driver(job: subprocess.Popen) -> None:
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    time.sleep(2)  # Ray processes started by the driver share its fate; let them go


def assert_committed_files_are_whole(out: Path) -> None:
    for path in committed(out):
        table = pq.read_table(path)
        assert table.column("position").to_pylist() == list(range(PER_SHARD)), path
    assert not list((out / "embeddings").glob("*.tmp")) if (out / "embeddings").exists() else True


def rerun_and_check(config: Path, out: Path) -> str:
    result = subprocess.run([sys.executable, "jobs/embed_wukong.py", "--config", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    keys = sorted(k for p in committed(out) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    assert keys == ALL_KEYS  # every input key exactly once
    assert not staged_parts(out)
    assert [p for p in (out / "embeddings").iterdir() if not p.name.endswith(".parquet")] == []
    return result.stdout + result.stderr


def test_driver_killed_before_any_commit(tiny_models, shard_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_models, shard_folder, out)
    job = start_job(config)
    wait_until(lambda: staged_parts(out) and not committed(out), job)
    kill_driver(job)
    assert committed(out) == []
    log = rerun_and_check(config, out)
    assert "removing staged parts of an earlier, interrupted run" in log


def test_driver_killed_between_commits(tiny_models, shard_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_models, shard_folder, out)
    job = start_job(config)
    wait_until(lambda: 0 < len(committed(out)) < N_SHARDS, job)
    kill_driver(job)
    done_before = {p.name: p.stat().st_mtime_ns for p in committed(out)}
    assert 0 < len(done_before) < N_SHARDS
    assert_committed_files_are_whole(out)
    log = rerun_and_check(config, out)
    # the rerun kept the committed shards as they were and did only the rest
    assert {p.name: p.stat().st_mtime_ns for p in committed(out) if p.name in done_before} == done_before
    assert f'"shards_skipped_already_committed": {len(done_before)}' in log


def test_a_partial_commit_left_by_a_kill_is_never_read_and_is_removed(tiny_models, shard_folder, tmp_path):
    """A commit killed mid-write leaves at most a hidden temp file beside the committed ones (local disk)
    or nothing (object stores publish a PUT whole). The kill of the driver is real; the half-written temp
    file is put in place by the test (the write lasts milliseconds: a kill cannot be timed into it here).
    Readers globbing *.parquet never see it; the rerun removes it and commits the shard."""
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_models, shard_folder, out)
    job = start_job(config)
    wait_until(lambda: len(committed(out)) >= 2, job)
    kill_driver(job)
    partial = out / "embeddings" / ".00007.parquet.tmp"
    partial.write_bytes(committed(out)[0].read_bytes()[:500])  # what the killed commit had written so far
    (out / "embeddings" / "00007.parquet").unlink(missing_ok=True)
    rerun_and_check(config, out)
    assert not partial.exists()


def encoder_actor_pids(job: subprocess.Popen) -> list[int]:
    """The encoder actors of this job alone: processes of its own tree (the local Ray it started), never a
    machine-wide name match that could find another job's encoder."""
    import psutil

    pids = []
    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if "MapWorker(MapBatches(Encoder))" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return pids


def test_encoder_actor_killed_mid_run(tiny_models, shard_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path, tiny_models, shard_folder, out)
    job = start_job(config)
    wait_until(lambda: staged_parts(out) and len(committed(out)) < N_SHARDS // 2 and encoder_actor_pids(job), job)
    (victim,) = encoder_actor_pids(job)
    os.kill(victim, signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert f"Worker PID: {victim}" in output  # Ray saw the actor die, restarted it and retried its batches
    keys = sorted(k for p in committed(out) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    assert keys == ALL_KEYS
    assert '"shards_committed": 8' in output


def stage_two_parts(cfg, run_id: str, url: str, samples: int) -> list[str]:
    """Two staged part files of one shard's embedded rows, as write_parts leaves them."""
    import numpy as np
    import pyarrow as pa

    from pipeline.embed.write import staging_dir
    from pipeline.io.schema import embedding_table_schema
    from pipeline.io.shards import shard_name

    schema = embedding_table_schema(cfg.write.embedding_dtype)
    folder = Path(staging_dir(cfg, run_id)) / shard_name(url)
    folder.mkdir(parents=True)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(samples * 512, np.float16)), 512)
    table = pa.table({"key": [f"k{i}" for i in range(samples)], "shard": [url] * samples,
                      "caption": ["一只猫"] * samples, "url": [None] * samples,
                      "status": ["ok"] * (samples - 1) + ["error"], "error": [None] * (samples - 1) + ["image_decode_failed: x"],
                      "image_embedding": vectors, "text_embedding": vectors,
                      "similarity": pa.array([0.5] * samples, pa.float32()), "position": list(range(samples)),
                      "warning": [None] * samples}).cast(schema)
    paths = [str(folder / "a.parquet"), str(folder / "b.parquet")]
    pq.write_table(table.slice(0, samples // 2), paths[0])
    pq.write_table(table.slice(samples // 2), paths[1])
    return paths


def test_a_commit_retried_after_it_committed_returns_its_counts(tiny_models, tmp_path):
    """Ray retries a commit whose worker died (max_retries=-1). Killed after the shard's file was written and
    while its parts were being deleted, the retry finds the parts gone: it must finish the clean-up and give
    the same counts, not fail the shard whose file is committed (CI's chaos run caught that: a summary with a
    failed shard whose embeddings were there, and exit 1)."""
    import shutil

    from conftest import job_config
    from pipeline.embed.write import commit_shard, embeddings_path

    cfg = job_config(tiny_models, "unused", str(tmp_path / "out"))
    url, run_id = str(tmp_path / "00003.tar"), "run-1"
    parts = stage_two_parts(cfg, run_id, url, 6)
    first = commit_shard(cfg, run_id, url, parts, 6, {"a": 1})
    written = Path(embeddings_path(cfg, "00003")).read_bytes()
    assert first == {"rows": 6, "ok": 5, "error": 1, "errors_by_reason": {"image_decode_failed": 1}}
    assert not Path(parts[0]).parent.exists()  # the parts are gone once committed
    # the kill landed mid-deletion: some parts still there, some gone; the retry runs with the same arguments
    Path(parts[0]).parent.mkdir()
    shutil.copy(__file__, parts[1])  # whatever is left is not read again
    assert commit_shard(cfg, run_id, url, parts, 6, {"a": 1}) == first
    assert Path(embeddings_path(cfg, "00003")).read_bytes() == written and not Path(parts[0]).parent.exists()
