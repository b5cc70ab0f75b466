"""encoder.actors as a range on Ray's fake autoscaling cluster: the pool and the cluster grow with the backlog."""

import time

import pyarrow.parquet as pq
import pytest
from conftest import CAPTIONS, job_config
from pipeline.embed.demo import encode_image, shape_image, write_tar_shard
from pipeline.embed.run import run_embed_job

N_SHARDS, PER_SHARD = 40, 10
ALL_KEYS = sorted(f"{s:05d}{i:04d}" for s in range(N_SHARDS) for i in range(PER_SHARD))


def fake_cluster_config(head_resources: dict, worker_node_types: dict) -> dict:
    """The fake multi-node provider's cluster config (Ray's wheel lacks the example.yaml AutoscalingCluster
    starts from): workers are raylets on this machine, launched and stopped by the real autoscaler."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {"ray.head.default": {"resources": head_resources, "node_config": {},
                                                      "max_workers": 0}, **worker_node_types},
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1, "docker": {},
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                               "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                               "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


@pytest.fixture
def autoscaling_cluster():
    """A 2-CPU head for the driver and read tasks; workers of one type, 1 logical GPU each, 1 to 3 of them.
    The autoscaler launches a worker (a local raylet) when Ray Data asks for more GPU nodes."""
    import ray
    from ray.cluster_utils import AutoscalingCluster
    from ray.data import DataContext

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kwargs):
            return fake_cluster_config(dict(head_resources), worker_node_types)

    cluster = Cluster(head_resources={"CPU": 2},
                      worker_node_types={"gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                                                 "min_workers": 1, "max_workers": 3}})
    cluster.start()
    try:
        ray.init(address="auto")
        deadline = time.time() + 120
        while ray.cluster_resources().get("GPU", 0) < 1 and time.time() < deadline:
            time.sleep(0.5)  # the min_workers node
        assert ray.cluster_resources().get("GPU", 0) >= 1
        DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()
        cluster.shutdown()


def large_jpeg_shards(folder):
    """Large JPEGs decoded in the actors (decode_on=encoder): the encoders are the bottleneck, so a backlog
    builds up in front of the one actor the job starts with."""
    photos = [encode_image(shape_image((200, 40 * seed, 90), "ellipse", (1600, 1200), seed), "JPEG", quality=90)
              for seed in range(4)]
    for s in range(N_SHARDS):
        members = []
        for i in range(PER_SHARD):
            key = f"{s:05d}{i:04d}"
            members += [(f"{key}.jpg", photos[(s + i) % 4]), (f"{key}.txt", CAPTIONS[i % 8].encode())]
        write_tar_shard(folder / f"{s:05d}.tar", members)


def test_encoder_pool_and_gpu_nodes_scale_out_with_the_backlog(autoscaling_cluster, tiny_models, tmp_path):
    """encoder.actors=1..3 on a cluster with one GPU node: the pool starts with one actor; only the backlog in
    front of it makes Ray Data ask for more, which the autoscaler answers with new GPU nodes. The summary's
    pairs_by_encoder says which actor, on which node, embedded how many of the pairs written."""
    ray = autoscaling_cluster
    large_jpeg_shards(tmp_path / "shards")
    out = tmp_path / "out"
    cfg = job_config(tiny_models, f"{tmp_path}/shards/{{00000..{N_SHARDS - 1:05d}}}.tar", str(out),
                     "encoder.actors=1..3", "encoder.num_gpus=1", "encoder.device=cpu", "encoder.num_cpus=0.5",
                     "encoder.batch_size=4", "read.decode_on=encoder", "read.num_cpus=0.5", "read.batch_size=10")
    nodes_at_start = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    summary = run_embed_job(cfg)
    assert len(nodes_at_start) == 1
    assert summary["shards_committed"] == N_SHARDS and summary["shards_failed"] == 0
    keys = sorted(k for p in (out / "embeddings").glob("*.parquet")
                  for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    assert keys == ALL_KEYS  # every key exactly once
    working = [e for e in summary["pairs_by_encoder"] if e["pairs"] > 0]
    assert sum(e["pairs"] for e in working) == len(ALL_KEYS)
    assert len(working) >= 2, working  # the pool grew past its minimum of 1 ...
    added = [e for e in working if e["node"] not in nodes_at_start]
    assert added, working  # ... and actors on GPU nodes the autoscaler added embedded pairs
