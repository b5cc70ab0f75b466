"""The KubeRay manifest runs the same entry point and config as the documented commands."""

from pathlib import Path

import yaml

from pipeline.config import actor_range, actors_per_gpu, load_config

REPO = Path(__file__).resolve().parents[1]


def test_rayjob_manifest_runs_the_embed_job_with_a_valid_config():
    manifest = yaml.safe_load((REPO / "configs" / "k8s" / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    words = manifest["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "jobs/embed_wukong.py"]
    config = words[words.index("--config") + 1]
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config(REPO / config, overrides)
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu_group = groups["a100"]
    gpus = int(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    # encoder.num_gpus each, from the smallest to the largest GPU group the cluster can scale to
    per_pod = gpus * actors_per_gpu(cfg.encoder.num_gpus)
    assert actor_range(cfg.encoder.actors) == (gpu_group["minReplicas"] * per_pod, gpu_group["maxReplicas"] * per_pod)
    cpus = float(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert per_pod * cfg.encoder.num_cpus < cpus  # room left for read tasks
    labels = lambda group: dict(kv.split("=") for kv in group["rayStartParams"]["labels"].split(","))  # noqa: E731
    assert labels(gpu_group) == cfg.encoder.node_labels  # the encoders' labels are on the GPU pods
    assert labels(groups["cpu"]) == {"node-kind": "cpu"}
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_raycronjob_runs_the_nightly_embed_then_curate_with_the_rayjobs_cluster():
    from pipeline.curate.run import load_filter_config

    cron = yaml.safe_load((REPO / "configs" / "k8s" / "raycronjob.yaml").read_text())
    job = yaml.safe_load((REPO / "configs" / "k8s" / "rayjob.yaml").read_text())
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob"
    spec = cron["spec"]
    minute, hour, *rest = spec["schedule"].split()
    assert len(rest) == 3 and rest == ["*", "*", "*"] and 0 <= int(minute) < 60 and 0 <= int(hour) < 24  # nightly
    template = spec["jobTemplate"]
    # KubeRay's RayCronJob has no concurrencyPolicy: a run ends before the next night's starts
    assert 0 < template["activeDeadlineSeconds"] < 24 * 3600
    assert template["rayClusterSpec"] == job["spec"]["rayClusterSpec"]  # one cluster shape for both manifests
    embed, curate = (part.split() for part in template["entrypoint"].split("&&"))
    assert embed[:2] == ["python", "jobs/embed_wukong.py"] and curate[:2] == ["python", "jobs/filter_pairs.py"]

    def overrides(words):
        return [words[i + 1] for i, w in enumerate(words) if w == "--set"]

    embed_cfg = load_config(REPO / embed[embed.index("--config") + 1], overrides(embed))
    filter_cfg = load_filter_config(REPO / curate[curate.index("--config") + 1], overrides(curate))
    assert filter_cfg.embeddings == embed_cfg.output  # it curates what the embed step wrote
    assert filter_cfg.overwrite  # every night's result is one rule over all tables (README, "Reruns")
