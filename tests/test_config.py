"""Config errors are clear ValueErrors naming the field, before Ray starts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import dump, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = ["input=/data/{00000..00003}.tar", "output=/tmp/out"]
GIB = 2**30


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: s3://b/wukong/{00000..00009}.tar\noutput: s3://b/emb/\nencoder:\n  actors: 8\n"
                    "  num_gpus: 1\nmodel:\n  precision: bf16\n")
    cfg = load_config(path, ["encoder.actors=2", "write.embedding_dtype=float32", "model.text_revision=abc123"])
    assert cfg.encoder.actors == 2 and cfg.encoder.num_gpus == 1.0
    assert cfg.model.precision == "bf16" and cfg.model.text_revision == "abc123"
    assert cfg.write.embedding_dtype == "float32"
    assert cfg.model.text == "IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese"  # defaults fill the rest
    assert '"actors": 2' in dump(cfg)


@pytest.mark.parametrize("override, message", [
    ("encoder.actorz=2", "unknown config key(s): encoder.actorz"),
    ("colour=blue", "unknown config key(s): colour"),
    ("model.precision=fp8", "model.precision: expected one of auto, fp32, fp16, bf16"),
    ("write.embedding_dtype=bfloat16", "write.embedding_dtype"),
    ("encoder.actors=0", "encoder.actors: need 1 <= min <= max, got 0"),
    ("encoder.actors=two", "encoder.actors: expected a number, a range min..max (e.g. 1..8) or auto, got 'two'"),
    ("encoder.actors=8..2", "encoder.actors: need 1 <= min <= max, got '8..2'"),
    ("encoder.actors=1...8", "encoder.actors: expected a number, a range"),
    ("encoder.actors=true", "encoder.actors: expected a number, a range min..max or auto, got True"),
    ("read.decode_on=gpu", "read.decode_on: expected one of tasks, encoder, got 'gpu'"),
    ("read.node_labels=[cpu]", "read.node_labels: expected a mapping of label names to values"),
    ("encoder.batches_in_flight=0", "encoder.batches_in_flight: must be > 0"),
    ("encoder.num_gpus=-1", "encoder.num_gpus: must be >= 0"),
    ("encoder.cuda_graphs=true", "encoder.cuda_graphs: needs the towers on a GPU"),
    ("read.device_resize=cuda", "read.device_resize: expected torch or triton, got 'cuda'"),
    ("read.device_resize=triton", "read.device_resize: triton resizes on the encoder's GPU"),
    ("encoder.num_gpus=1.5", "encoder.num_gpus: a fraction of one GPU (0.5: two actors per GPU) or a whole number"),
    ("overwrite=maybe", "overwrite: expected bool"),
    ("model.precision=fp16", "fp16 needs a GPU"),
    ("model=gpt", "model: expected a mapping"),
    ("model={a: 1}", "model: expected a mapping"),
    ("output=", "output: must not be null"),
    ("input=''", "input: required"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [*BASE, override])
    assert message in str(err.value)


def test_an_actor_pool_that_takes_every_cpu_is_refused():
    with pytest.raises(ValueError, match="reserves all 2 CPUs"):
        load_config(None, [*BASE, "ray.num_cpus=2", "encoder.actors=2", "encoder.num_cpus=1"])
    with pytest.raises(ValueError, match="reserves all 2 CPUs"):  # a range can grow to its maximum
        load_config(None, [*BASE, "ray.num_cpus=2", "encoder.actors=1..4", "encoder.num_cpus=0.5"])


def test_actor_ranges_and_node_labels_from_the_command_line():
    from pipeline.config import actor_range

    cfg = load_config(None, [*BASE, "encoder.actors=2..16", "read.node_labels={node-kind: cpu}"])
    assert actor_range(cfg.encoder.actors) == (2, 16) and actor_range(8) == (8, 8)
    assert cfg.read.node_labels == {"node-kind": "cpu"} and cfg.encoder.node_labels == {}


def test_malformed_set_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(None, [*BASE, "encoder.actors"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        load_config(bad)


def test_cli_reports_config_errors_before_ray_starts():
    result = subprocess.run([sys.executable, "jobs/embed_wukong.py", "--config", "configs/demo.yaml",
                             "--set", "encoder.batch_sise=4"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "config error: unknown config key(s): encoder.batch_sise" in result.stderr
    assert "Started a local Ray" not in result.stderr + result.stdout


def test_shipped_configs_are_valid():
    from pipeline.curate.run import load_filter_config
    from pipeline.eval.evaluate import load_eval_config

    configs = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert configs == {"demo.yaml", "wukong.yaml", "benchmark.yaml", "benchmark-gpu.yaml", "filter.yaml",
                       "filter-concepts.yaml", "eval.yaml"}
    for name in ("demo.yaml", "wukong.yaml", "benchmark.yaml", "benchmark-gpu.yaml"):
        load_config(REPO / "configs" / name)
    # the exact path stays the default where figures favour it (CPU); the GPU production config decodes there
    assert load_config(REPO / "configs" / "demo.yaml").read.decode_on == "tasks"
    assert load_config(REPO / "configs" / "benchmark.yaml").read.decode_on == "tasks"
    assert load_config(REPO / "configs" / "wukong.yaml").read.decode_on == "encoder"
    load_filter_config(REPO / "configs" / "filter.yaml")
    assert len(load_filter_config(REPO / "configs" / "filter-concepts.yaml").concepts) == 4
    load_eval_config(REPO / "configs" / "eval.yaml", ["retrieval=flickr30k-cn/*.tar"])


def test_a_checkpoint_missing_the_projection_is_refused(tiny_models, tmp_path):
    """A CLIP vision checkpoint without visual_projection (or a BERT without the 512-way classifier)
    would load with random layers; the encoder refuses it, naming the weights."""
    from transformers import BertModel, CLIPVisionModel

    from pipeline.embed.model import load_towers

    text, image = tiny_models
    CLIPVisionModel.from_pretrained(image).save_pretrained(tmp_path / "no-projection")
    cfg = load_config(None, [*BASE, f"model.text={text}", f"model.image={tmp_path / 'no-projection'}"])
    with pytest.raises(ValueError, match="visual_projection"):
        load_towers(cfg, random_weights=False)
    BertModel.from_pretrained(text).save_pretrained(tmp_path / "plain-bert")
    cfg = load_config(None, [*BASE, f"model.text={tmp_path / 'plain-bert'}", f"model.image={image}"])
    with pytest.raises(ValueError, match="classifier"):
        load_towers(cfg, random_weights=False)
    load_towers(load_config(None, [*BASE, f"model.text={text}", f"model.image={image}"]), random_weights=False)


def test_demo_config_never_writes_over_real_data(tmp_path):
    from pipeline.embed.demo import make_demo_shards

    (tmp_path / "00000.tar").write_bytes(b"a user's shard")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"input={tmp_path}/{{00000..00002}}.tar"])
    make_demo_shards(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar"]
    assert (tmp_path / "00000.tar").read_bytes() == b"a user's shard"
    fresh = load_config(REPO / "configs" / "demo.yaml", [f"input={tmp_path}/new/{{00000..00001}}.tar"])
    assert make_demo_shards(fresh) == [] and not (tmp_path / "new").exists()  # only at the demo's own path


@pytest.mark.parametrize("overrides, resources, actors", [
    (["encoder.actors=auto", "encoder.num_cpus=0.5"], {"CPU": 2.0}, 2),           # the demo on 2 cores
    (["encoder.actors=auto", "encoder.num_cpus=0.5"], {"CPU": 16.0, "GPU": 1}, 16),  # CPU towers: GPUs ignored
    (["encoder.actors=auto", "encoder.num_gpus=1"], {"CPU": 96.0, "GPU": 8.0}, 8),  # one per GPU
    (["encoder.actors=auto", "encoder.num_gpus=0.5"], {"CPU": 96.0, "GPU": 8.0}, 16),
    (["encoder.actors=3", "encoder.num_gpus=1"], {"CPU": 96.0, "GPU": 8.0}, 3),     # a number stays
    (["encoder.actors=2..6"], {"CPU": 96.0}, "2..6"),
    # memory: a 16-core laptop whose Ray has 8 GiB holds 3 actors of 2.5 GiB; a roomy node is not capped
    (["encoder.actors=auto", "encoder.num_cpus=0.5", "encoder.memory_gib=2.5"], {"CPU": 16.0, "memory": 8 * GIB}, 3),
    (["encoder.actors=auto", "encoder.num_cpus=0.5", "encoder.memory_gib=2.5"], {"CPU": 16.0, "memory": 64 * GIB}, 16),
    (["encoder.actors=auto", "encoder.num_gpus=1", "encoder.memory_gib=4"], {"GPU": 8.0, "memory": 20 * GIB}, 5),
])
def test_auto_actors_are_sized_from_the_ray_clusters_resources(overrides, resources, actors):
    from pipeline.config import resolve_actors

    cfg = load_config(None, [*BASE, *overrides])
    assert resolve_actors(cfg, resources).encoder.actors == actors


@pytest.mark.parametrize("overrides, resources, message", [
    (["encoder.num_gpus=1"], {"CPU": 16.0}, "encoder.actors=auto: the Ray cluster has 0 GPUs"),
    (["encoder.num_cpus=1"], {"CPU": 4.0}, "encoder.actors x encoder.num_cpus = 4 reserves all 4 CPUs"),
    (["encoder.num_cpus=0.5", "encoder.memory_gib=2.5"], {"CPU": 4.0, "memory": 2 * GIB},
     "the Ray cluster has 2.0 GiB of memory, less than one actor's encoder.memory_gib=2.5"),
])
def test_auto_actors_that_cannot_fit_are_a_clear_error(overrides, resources, message):
    from pipeline.config import resolve_actors

    cfg = load_config(None, [*BASE, "encoder.actors=auto", *overrides])
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_actors(cfg, resources)


def test_the_demo_uses_every_core_with_one_single_threaded_actor_each():
    from pipeline.config import resolve_actors

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.ray.num_cpus is None and cfg.ray.address is None  # a local Ray over every core
    assert cfg.encoder.torch_threads == 1 and cfg.encoder.num_gpus == 0
    assert resolve_actors(cfg, {"CPU": 12.0, "memory": 64 * GIB}).encoder.actors == 12
    # the towers' memory is reserved, so a many-core machine with little RAM runs fewer actors, not out of memory
    assert resolve_actors(cfg, {"CPU": 12.0, "memory": 8 * GIB}).encoder.actors == 3
