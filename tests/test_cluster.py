"""Multi-node behaviour on a simulated Ray cluster: a CPU-less head and two 1-GPU (logical) workers."""

import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import encoder_placement, job_config, make_shards
from pipeline.embed.run import run_embed_job

N_SHARDS, PER_SHARD = 8, 6
ALL_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(N_SHARDS) for i in range(PER_SHARD))


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # 4 CPUs a node: the read tasks (8 x 0.25 CPU at most) can never take the CPU an actor needs
    workers = [cluster.add_node(num_cpus=4, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    DataContext.get_current().enable_progress_bars = False
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def gpu_config(tiny_models, shard_folder, out, *overrides):
    # logical GPUs: the actors reserve one each, and run the towers on CPU
    return job_config(tiny_models, f"{shard_folder}/{{00000..{N_SHARDS - 1:05d}}}.tar", str(out),
                      "encoder.actors=2", "encoder.num_gpus=1", "encoder.device=cpu", "encoder.num_cpus=0.5",
                      # start feeding only once the whole pool is up, so every actor takes part in a short job
                      "encoder.wait_for_actors_s=120",
                      "read.num_cpus=0.25",
                      *overrides)


def output_keys(out):
    return sorted(k for p in (out / "embeddings").glob("*.parquet")
                  for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())


def test_encoder_actors_spread_one_per_gpu_across_nodes(cluster, tiny_models, tmp_path, monkeypatch):
    from ray.data import DataContext

    _, workers = cluster
    make_shards(tmp_path / "shards", N_SHARDS, PER_SHARD)
    out = tmp_path / "out"
    # In a job this short Ray Data may hand every batch to one actor: it sends a batch to the actor on the
    # node holding most of its blocks (ties to the lower node id), as long as that actor has fewer than 4
    # batches in flight, and the reads are not always spread evenly (CI once saw all 48 pairs on one node;
    # runs here: 6/42). With one batch in flight per actor, a batch that comes while the first is busy goes to
    # the other; one shard (one read block) per batch gives 8 batches to share instead of 4.
    monkeypatch.setattr(DataContext.get_current(), "max_tasks_in_flight_per_actor", 1)
    with encoder_placement() as placement:
        summary = run_embed_job(gpu_config(tiny_models, tmp_path / "shards", out, f"encoder.batch_size={PER_SHARD}"))
    assert summary["shards_committed"] == N_SHARDS and summary["samples"] == len(ALL_KEYS)
    assert output_keys(out) == ALL_KEYS  # every sample written once
    assert len(placement) == 2
    assert sorted(placement.values()) == sorted(w.node_id for w in workers)  # one actor on each GPU node ...
    assert sorted(pairs_by_node(summary)) == sorted(w.node_id for w in workers)  # ... and both embedded pairs


def test_half_a_gpu_each_puts_two_encoder_actors_on_every_gpu(cluster, tiny_models, tmp_path):
    """encoder.num_gpus=0.5 with encoder.actors=auto: two actors (two processes) on each GPU node, four in all."""
    _, workers = cluster
    make_shards(tmp_path / "shards", N_SHARDS, PER_SHARD)
    out = tmp_path / "out"
    with encoder_placement() as placement:
        summary = run_embed_job(gpu_config(tiny_models, tmp_path / "shards", out, "encoder.actors=auto",
                                           "encoder.num_gpus=0.5"))
    assert summary["samples"] == len(ALL_KEYS) and output_keys(out) == ALL_KEYS
    assert sorted(placement.values()) == sorted(w.node_id for w in workers for _ in range(2))


def pairs_by_node(summary) -> dict[str, int]:
    pairs = {}
    for encoder in summary["pairs_by_encoder"]:
        pairs[encoder["node"]] = pairs.get(encoder["node"], 0) + encoder["pairs"]
    return pairs


def test_job_completes_when_a_worker_node_is_lost(cluster, tiny_models, tmp_path):
    """A worker node is removed while it runs a batch (its raylet, actor, tasks and objects gone at once), a new
    one is added as an autoscaler would: the job ends with every key once, the rest done by the other nodes."""
    from pipeline.bench.chaos import raylet, stage_processes

    ray_cluster, workers = cluster
    make_shards(tmp_path / "shards", N_SHARDS, PER_SHARD)
    out = tmp_path / "out"
    cfg = gpu_config(tiny_models, tmp_path / "shards", out, "read.batch_size=2", "encoder.batch_size=2")
    result = {}
    job = threading.Thread(target=lambda: result.update(run_embed_job(cfg)))
    job.start()
    lost = workers[1]
    lost_raylet = raylet(lost)
    committed = lambda: len(list((out / "embeddings").glob("*.parquet"))) if (out / "embeddings").exists() else 0
    deadline, in_flight = time.time() + 120, []
    while not in_flight and time.time() < deadline:  # its encoder in the middle of a batch
        in_flight = stage_processes(lost_raylet).get("encoder", [])
        time.sleep(0.01)
    if not in_flight:
        pytest.fail("the node's encoder never ran a batch within 120 s")
    done_before = committed()
    ray_cluster.remove_node(lost, allow_graceful=False)
    replacement = ray_cluster.add_node(num_cpus=4, num_gpus=1)
    job.join(timeout=300)
    assert not job.is_alive(), "the job did not finish within 300 s of the node loss"
    assert done_before < N_SHARDS  # the loss came with work left
    assert result["shards_committed"] == N_SHARDS and result["shards_failed"] == 0, result["failed_shards"]
    assert output_keys(out) == ALL_KEYS  # every key exactly once
    pairs = pairs_by_node(result)
    assert sum(pairs.values()) == len(ALL_KEYS)
    assert set(pairs) <= {workers[0].node_id, lost.node_id, replacement.node_id}, pairs
    # the batch in flight on the lost node never reached the driver from it, yet every key is there once:
    # what the lost node had not delivered (that batch included) was embedded by the node that stayed or by
    # the replacement (which of the two depends on timing)
    elsewhere = pairs.get(workers[0].node_id, 0) + pairs.get(replacement.node_id, 0)
    assert elsewhere >= cfg.encoder.batch_size and pairs.get(lost.node_id, 0) < len(ALL_KEYS), pairs


@pytest.fixture
def cpu_and_gpu_nodes():
    """Two CPU-only nodes (read and decode) and two logical-GPU nodes (encoders), labelled as cluster.yaml does.
    The GPU nodes have CPUs to spare, so nothing but the labels keeps the read tasks off them."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cpu_nodes = [cluster.add_node(num_cpus=2, labels={"node-kind": "cpu"}) for _ in range(2)]
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1, labels={"node-kind": "gpu"}) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    DataContext.get_current().enable_progress_bars = False
    yield cpu_nodes, gpu_nodes
    ray.shutdown()
    cluster.shutdown()


def test_read_tasks_on_cpu_only_nodes_and_encoders_on_gpu_nodes(cpu_and_gpu_nodes, tiny_models, tmp_path):
    from ray.util.state import list_actors, list_tasks

    cpu_nodes, gpu_nodes = cpu_and_gpu_nodes
    make_shards(tmp_path / "shards", N_SHARDS, PER_SHARD)
    out = tmp_path / "out"
    summary = run_embed_job(gpu_config(tiny_models, tmp_path / "shards", out, "read.node_labels={node-kind: cpu}",
                                       "encoder.node_labels={node-kind: gpu}"))
    assert summary["shards_committed"] == N_SHARDS and output_keys(out) == ALL_KEYS  # every key exactly once

    reads = [t for t in list_tasks(detail=True, limit=10_000) if "read_and_preprocess" in t.name]
    assert len(reads) >= N_SHARDS  # one per shard (and any retries)
    assert {t.node_id for t in reads} <= {n.node_id for n in cpu_nodes}
    actors = [a for a in list_actors(detail=True, limit=10_000) if "Encoder" in a.class_name]
    assert len(actors) == 2
    assert sorted(a.node_id for a in actors) == sorted(n.node_id for n in gpu_nodes)
