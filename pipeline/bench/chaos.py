"""Chaos: the embed job while its own processes are SIGKILLed at random moments, and its driver killed and rerun.

Worker phase: a multi-node `ray.cluster_utils.Cluster` on this machine (a head for the read, write and commit
tasks, worker nodes with one logical GPU each for the encoders). `python jobs/embed_wukong.py` runs against it
while a killer SIGKILLs, at random moments, the processes of this cluster that run a stage of the job (read
tasks, encoder actors, write tasks, commit tasks) and removes whole worker nodes, adding each back as an
autoscaler would. The job must end with exit 0, without a rerun.

Driver phase: the job on its own local Ray, its driver SIGKILLed at a random moment, then run again, until it
ends with exit 0.

Only processes of the job under test are killed (the workers of the cluster this process started, the drivers
it started), never by a machine-wide name match. Every output is checked against the input: keys lost, keys written twice, clean
samples written as errors, planted bad samples not written as errors.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import yaml

from pipeline.embed.demo import encode_image, shape_image, write_tar_shard

REPO = Path(__file__).resolve().parents[2]
# what a worker process's title holds while it runs a stage of the job: Ray titles a busy worker `ray::<task>`,
# and an actor `ray::<class>.<method>` while a call runs (`.submit`: a batch; an idle encoder is not a target)
STAGES = {"read": "ray::MapBatches(read_and_preprocess)", "encoder": "ray::MapWorker(MapBatches(Encoder)).submit",
          "write": "ray::MapBatches(write_parts)", "commit": "ray::commit_shard"}
BAD_EVERY = 37  # one sample in 37 has an image that is not an image: it must come out as an error row
CAPTIONS = ["一只猫坐在窗台上", "蓝天下的绿色草地", "红色的圆形标志", "城市夜景中的高楼", "桌上的一碗面条", "海边的日落"]


def make_chaos_shards(folder: Path, n_shards: int, per_shard: int) -> dict[str, str]:
    """Shards 00000.tar ... with keys {shard:05d}{i:04d}; returns each key's expected status."""
    images = [encode_image(shape_image((40 * c % 255, 90, 200 - 30 * c), ["ellipse", "rectangle", "polygon"][c % 3],
                                       (320, 240), c), "JPEG", quality=85) for c in range(12)]
    expected = {}
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, n = f"{s:05d}{i:04d}", s * per_shard + i
            bad = n % BAD_EVERY == BAD_EVERY - 1
            members += [(f"{key}.jpg", b"not an image" if bad else images[n % len(images)]),
                        (f"{key}.txt", CAPTIONS[n % len(CAPTIONS)].encode())]
            expected[key] = "error" if bad else "ok"
        write_tar_shard(folder / f"{s:05d}.tar", members)
    return expected


def check_output(out: Path, expected: dict[str, str]) -> dict:
    """What the committed tables hold against what the input holds."""
    seen, status = collections.Counter(), {}
    for path in sorted((out / "embeddings").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "status"])
        for key, st in zip(table.column("key").to_pylist(), table.column("status").to_pylist()):
            seen[key] += 1
            status[key] = st
    return {"rows": sum(seen.values()),
            "lost": sorted(k for k in expected if k not in seen),
            "duplicated": sorted(k for k, n in seen.items() if n > 1),
            "unexpected": sorted(k for k in seen if k not in expected),
            "wrongly_errored": sorted(k for k, st in status.items() if st != "ok" and expected.get(k) == "ok"),
            "bad_not_errored": sorted(k for k, st in status.items() if st == "ok" and expected.get(k) == "error")}


def clean(check: dict) -> bool:
    return not any(check[k] for k in ("lost", "duplicated", "unexpected", "wrongly_errored", "bad_not_errored"))


def counted(check: dict) -> dict:
    """The check with each list of keys as its length, and the first few keys of the non-empty ones."""
    return {k: (len(v) if isinstance(v, list) else v) for k, v in check.items()} | {
        f"{k}_first": v[:5] for k, v in check.items() if isinstance(v, list) and v}


def write_job_config(folder: Path, shards: int, models: tuple[Path, Path], multi_node: bool) -> Path:
    """The job's config: small batches, so that a run has many blocks, parts and commits to kill in between."""
    text, image = models
    config = {
        "input": f"{folder / 'shards'}/{{00000..{shards - 1:05d}}}.tar", "output": str(folder / "out"),
        "model": {"text": str(text), "image": str(image)},
        "read": {"batch_size": 8, "num_cpus": 0.5, "retry_backoff_s": 0.2},
        "encoder": {"actors": 2, "num_cpus": 0.5, "batch_size": 8, "torch_threads": 1},
        "write": {"num_cpus": 0.25},
        "ray": {"num_cpus": 2, "progress_interval_s": 5},
    }
    if multi_node:  # one encoder per (logical) GPU node; the towers run on CPU
        config["encoder"].update(num_gpus=1, device="cpu", wait_for_actors_s=300)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def start_job(config: Path, log: Path, address: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    with open(log, "a") as sink:
        return subprocess.Popen([sys.executable, "jobs/embed_wukong.py", "--config", str(config)], cwd=REPO,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def raylet(node) -> psutil.Process:
    """The raylet of a node of a `ray.cluster_utils.Cluster`: its workers and actors are its children."""
    from ray._private import ray_constants

    return psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)


def stage_processes(*roots: psutil.Process) -> dict[str, list[psutil.Process]]:
    """The processes under `roots` (the raylets of the cluster this process started) now running a stage of
    the job, by stage."""
    found = collections.defaultdict(list)
    for proc in (child for root in roots for child in root.children(recursive=True)):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        for stage, marker in STAGES.items():
            if title.startswith(marker):
                found[stage].append(proc)
    return found


def kill_one(roots: list[psutil.Process], stage: str, rng: random.Random, wait_s: float = 3.0) -> bool:
    """SIGKILL a process under `roots` running `stage`, waiting up to `wait_s` for one (tasks are short)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        running = stage_processes(*roots).get(stage)
        if running:
            try:
                os.kill(rng.choice(running).pid, signal.SIGKILL)
                return True
            except ProcessLookupError:  # it finished meanwhile
                pass
        time.sleep(0.02)
    return False


def committed(out: Path) -> int:
    folder = out / "embeddings"
    return len(list(folder.glob("*.parquet"))) if folder.exists() else 0


def summary_of(log: Path) -> dict | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("summary: ")]
    return json.loads(lines[-1][len("summary: "):]) if lines else None


def lose_node(cluster, nodes: list, rng: random.Random) -> int:
    """Remove a worker node at random (its raylet, workers, actors and objects gone at once) and add a new one
    in its place, as an autoscaler would; returns how many stage processes it was running then. The node is
    taken while it runs a stage, where it does within 5 s."""
    victim = rng.choice(nodes)
    its_raylet = raylet(victim)
    deadline = time.monotonic() + 5
    while not (in_flight := sum(map(len, stage_processes(its_raylet).values()))) and time.monotonic() < deadline:
        time.sleep(0.02)
    cluster.remove_node(victim, allow_graceful=False)
    nodes.remove(victim)
    nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))
    return in_flight


def worker_phase(folder: Path, expected: dict[str, str], models: tuple[Path, Path], kills: int, node_losses: int,
                 seed: int, baseline: bool = True, gpu_nodes: int = 2, interval_s: tuple[float, float] = (0.2, 1.0),
                 timeout_s: float = 1800) -> dict:
    """The job on a multi-node cluster, its stages' processes killed `kills` times (and more, until every stage
    has been killed at least once) and worker nodes lost `node_losses` times while it runs. With `baseline`, the same job runs first without chaos, for the extra
    wall time."""
    from ray.cluster_utils import Cluster

    rng = random.Random(seed)
    shards = len({k[:5] for k in expected})
    config = write_job_config(folder, shards, models, multi_node=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(gpu_nodes)]
    cluster.wait_for_nodes()
    report = {"kills": collections.Counter(), "no_target_within_3s": collections.Counter(), "node_losses": 0,
              "node_losses_with_work_in_flight": 0, "shards": shards, "samples": len(expected)}
    try:
        if baseline:
            started = time.monotonic()
            job = start_job(config, folder / "baseline.log", cluster.address)
            report["baseline_exit_code"] = job.wait(timeout=timeout_s)
            report["baseline_wall_s"] = round(time.monotonic() - started, 1)
            report["baseline_check"] = counted(check_output(folder / "out", expected))
            shutil.rmtree(folder / "out")

        log = folder / "chaos.log"
        started = time.monotonic()
        job, order = start_job(config, log, cluster.address), []
        while job.poll() is None and time.monotonic() - started < timeout_s:
            time.sleep(rng.uniform(*interval_s))
            done = sum(report["kills"].values())
            missing = [stage for stage in sorted(STAGES) if not report["kills"][stage]]
            if done >= kills and report["node_losses"] >= node_losses and not missing:
                continue  # every kill made, every stage killed at least once: let the job finish
            # node losses spread over the run: one after each (kills / node_losses) kills
            lost = report["node_losses"]
            if lost < node_losses and done >= (lost + 1) * kills // (node_losses + 1):
                in_flight = lose_node(cluster, nodes, rng)
                report["node_losses"] += 1
                report["node_losses_with_work_in_flight"] += in_flight > 0
                continue
            if not order:  # the stages in turn, each round in a random order
                order = rng.sample(sorted(STAGES), len(STAGES))
            # past the count, only the stages not killed yet (one that was idle at each of its turns)
            stage = order.pop() if done < kills else rng.choice(missing)
            if kill_one([raylet(n) for n in [cluster.head_node, *nodes]], stage, rng):
                report["kills"][stage] += 1
            else:
                report["no_target_within_3s"][stage] += 1
        if job.poll() is None:
            job.kill()
            job.wait()
            report["timed_out"] = True
        report["exit_code"] = job.returncode
        report["wall_s"] = round(time.monotonic() - started, 1)
        if baseline:
            report["extra_wall_s"] = round(report["wall_s"] - report["baseline_wall_s"], 1)
        report["kills"], report["no_target_within_3s"] = dict(report["kills"]), dict(report["no_target_within_3s"])
        report["worker_and_actor_kills"] = sum(report["kills"].values())
        report["summary"] = summary_of(log)
        report["check"] = check_output(folder / "out", expected)
        report["log"] = str(log)
    finally:
        cluster.shutdown()
    return report


def driver_phase(folder: Path, expected: dict[str, str], models: tuple[Path, Path], kills: int, seed: int,
                 timeout_s: float = 600) -> dict:
    """The job on a local Ray; its driver SIGKILLed at a random moment of a run, then run again; a run that
    ends before its kill is checked, and the next starts from an empty output. Ends with a run to its end."""
    rng = random.Random(seed + 1)
    shards = len({k[:5] for k in expected})
    config = write_job_config(folder, shards, models, multi_node=False)
    out, log = folder / "out", folder / "driver.log"
    report = {"kills": 0, "kills_at": [], "completed_runs": [], "shards": shards, "samples": len(expected)}

    started = time.monotonic()  # an undisturbed run first: the kill moments are drawn within its length
    job = start_job(config, log, None)
    baseline_s = time.monotonic() - started if job.wait(timeout=timeout_s) == 0 else None
    report["baseline_wall_s"] = baseline_s and round(baseline_s, 1)
    if baseline_s is None:  # the job fails undisturbed: nothing to kill, the report says how it ended
        report.update(exit_code=job.returncode, check=check_output(out, expected), log=str(log))
        return report
    shutil.rmtree(out)

    while report["kills"] < kills:
        job = start_job(config, log, None)
        at = rng.uniform(0.5, baseline_s)
        try:
            code = job.wait(timeout=at)
        except subprocess.TimeoutExpired:
            before = committed(out)
            tree = psutil.Process(job.pid).children(recursive=True)  # the local Ray it started
            job.send_signal(signal.SIGKILL)
            job.wait()
            _, alive = psutil.wait_procs(tree, timeout=15)  # Ray's own processes share the driver's fate ...
            for proc in alive:  # ... and those that do not are ended here
                proc.kill()
            report["kills"] += 1
            report["kills_at"].append({"s": round(at, 1), "shards_committed_then": before})
            continue
        report["completed_runs"].append({"exit_code": code, "check": counted(check_output(out, expected))})
        shutil.rmtree(out)  # the next kills land in a run with work to do

    code = start_job(config, log, None).wait(timeout=timeout_s)  # the rerun after the last kill
    report["exit_code"] = code
    report["check"] = check_output(out, expected)
    report["summary"] = summary_of(log)
    report["log"] = str(log)
    return report


def passed(report: dict, kills: int, node_losses: int) -> bool:
    worker, driver = report.get("worker_phase"), report.get("driver_phase")
    ok = True
    if worker is not None:
        ok &= (worker["exit_code"] == 0 and clean(worker["check"]) and worker["worker_and_actor_kills"] >= kills
               and set(worker["kills"]) == set(STAGES) and worker["node_losses"] >= node_losses)
    if driver is not None:
        ok &= (driver["exit_code"] == 0 and clean(driver["check"]) and driver["kills"] >= report["driver_kills_asked"]
               and all(r["exit_code"] == 0 and clean(r["check"]) for r in driver["completed_runs"]))
    return bool(ok)
