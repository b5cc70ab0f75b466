"""cluster.yaml passes Ray's own cluster-launcher schema validation, offline."""

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError

REPO = Path(__file__).resolve().parents[1]


def validated(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = validated(config)
    assert prepared["available_node_types"]["a100"]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}
    image = prepared["docker"]["image"]
    assert image.startswith("rayproject/ray:") and "ray-ml" not in image and not image.endswith(":latest")
    assert any("pip install" in c and "taiyi-embed" in c for c in prepared["setup_commands"])


def test_cluster_yaml_node_types_match_the_wukong_config():
    from pipeline.config import actor_range, actors_per_gpu, load_config

    types = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    cfg = load_config(REPO / "configs" / "wukong.yaml")
    gpu, cpu = types["a100"], types["cpu"]
    assert gpu["labels"] == cfg.encoder.node_labels and cpu["labels"] == {"node-kind": "cpu"}
    # the autoscaling pool spans the GPU node type's range: 8 A100s per p4d.24xlarge, encoder.num_gpus each
    per_node = 8 * actors_per_gpu(cfg.encoder.num_gpus)
    assert actor_range(cfg.encoder.actors) == (gpu["min_workers"] * per_node, gpu["max_workers"] * per_node)
    assert per_node * cfg.encoder.num_cpus < 96  # the actors leave a p4d.24xlarge's vCPUs room for read tasks


@pytest.mark.parametrize("mutate, error, message", [
    (lambda c: c["available_node_types"]["a100"].update(min_workerz=1), ValidationError, "min_workerz"),  # typo
    (lambda c: c.update(max_workers="eight"), ValidationError, "'eight' is not of type 'integer'"),
    (lambda c: c.update(head_node_type="gpu"), ValueError, "head_node_type"),
])
def test_a_broken_cluster_yaml_fails_validation(mutate, error, message):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mutate(config)
    with pytest.raises(error, match=message):
        validated(config)
