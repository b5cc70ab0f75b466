"""The KubeRay manifest runs the same entry point and config as the documented commands."""

from pathlib import Path

import yaml

from pipeline.config import load_config

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
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert cfg.encoder.num_gpus == 1 and cfg.encoder.actors == gpus  # one actor per GPU of a node
