"""One output, one result: reruns with other settings are refused before any work, start-up mistakes are one
line and exit 2 before Ray starts, and every summary says whether the weights were random."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config, make_shards
from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.embed.run import run_embed_job
from pipeline.io.schema import embedding_table_schema

REPO = Path(__file__).resolve().parents[1]


def run_job(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def tables_with_similarities(folder: Path, similarities: list[np.ndarray], random_weights: bool = False) -> None:
    """Embedding tables in the embed job's schema and file metadata, with chosen similarities."""
    meta = {"text_model": "t", "text_revision": None, "image_model": "i", "image_revision": None,
            "random_weights": random_weights}
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    for s, values in enumerate(similarities):
        n = len(values)
        pq.write_table(pa.table({
            "key": [f"{s}-{i}" for i in range(n)], "shard": [f"/nowhere/{s:05d}.tar"] * n, "caption": ["标题"] * n,
            "url": [None] * n, "status": ["ok"] * n, "error": [None] * n, "image_embedding": [None] * n,
            "text_embedding": [None] * n, "similarity": [float(v) for v in values], "position": list(range(n)),
            "warning": [None] * n}, schema=embedding_table_schema("float16", meta)),
            folder / "embeddings" / f"{s:05d}.parquet")


def kept(out: Path) -> dict[str, float]:
    return {r["key"]: r["similarity"] for p in sorted((out / "keep").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the filter job ---------------------------------------------------------------------------------------

def test_a_filter_rerun_with_another_rule_is_refused_and_overwrite_recomputes(local_ray, tmp_path):
    rng = np.random.default_rng(0)
    tables_with_similarities(tmp_path / "emb", [rng.uniform(-0.05, 0.05, 30).astype(np.float32) for _ in range(3)])

    def cfg(*overrides):
        return load_filter_config(None, [f"embeddings={tmp_path / 'emb'}", f"output={tmp_path / 'out'}",
                                         "report=false", *overrides])

    first = run_filter_job(cfg("min_similarity=-0.03"))
    assert min(kept(tmp_path / "out").values()) < 0.0  # the loose rule keeps pairs below 0
    before = files_of(tmp_path / "out")

    with pytest.raises(ValueError, match=r"other settings \(rule: \{\"min_similarity\": -0.03\} in the output, "
                                         r"\{\"min_similarity\": 0.0\} now\).*overwrite=true.*another output"):
        run_filter_job(cfg("min_similarity=0.0"))
    assert files_of(tmp_path / "out") == before  # nothing written: the summary still states the first rule

    again = run_filter_job(cfg("min_similarity=-0.03"))  # the same rule: resumes, skips, same files
    assert again["shards_skipped_already_written"] == 3 and files_of(tmp_path / "out") == before

    second = run_filter_job(cfg("min_similarity=0.0", "overwrite=true"))
    pairs = kept(tmp_path / "out")
    assert pairs and min(pairs.values()) >= 0.0 and second["shards_skipped_already_written"] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rule"] == {"min_similarity": 0.0} and summary["kept"] == len(pairs) < first["kept"]


def test_a_filter_rerun_after_the_embeddings_changed_is_refused(local_ray, tmp_path):
    rng = np.random.default_rng(1)
    sims = [rng.uniform(0, 1, 20).astype(np.float32) for _ in range(3)]
    tables_with_similarities(tmp_path / "emb", sims[:2])
    cfg = load_filter_config(None, [f"embeddings={tmp_path / 'emb'}", f"output={tmp_path / 'out'}", "report=false",
                                    "keep_top_fraction=0.5"])
    run_filter_job(cfg)
    tables_with_similarities(tmp_path / "emb", sims)  # a nightly embed run added a table: the cut-off moves
    with pytest.raises(ValueError, match=r"embedding_tables: \{\"sha256\": \"\w+\", \"tables\": 2\} in the output, "
                                         r"\{\"sha256\": \"\w+\", \"tables\": 3\} now"):
        run_filter_job(cfg)


def test_filter_cli_refuses_another_rule_in_one_line_before_ray_and_says_random_weights(tmp_path):
    tables_with_similarities(tmp_path / "emb", [np.linspace(-0.1, 0.1, 20, dtype=np.float32)], random_weights=True)
    common = ["--set", f"embeddings={tmp_path / 'emb'}", "--set", f"output={tmp_path / 'out'}", "--set", "report=false",
              "--set", "write_shards=false", "--set", "ray_num_cpus=1"]
    first = run_job("filter_pairs.py", "--config", str(REPO / "configs" / "filter.yaml"), *common,
                    "--set", "min_similarity=-0.03", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "RANDOM WEIGHTS" in first.stderr
    line = next(l for l in first.stdout.splitlines() if l.startswith("summary: "))
    assert json.loads(line[len("summary: "):])["random_weights"] is True
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["random_weights"] is True

    second = run_job("filter_pairs.py", "--config", str(REPO / "configs" / "filter.yaml"), *common,
                     "--set", "min_similarity=0.0", cwd=tmp_path)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1].startswith("config error: output ")
    assert "Traceback" not in second.stderr and "Started a local Ray" not in second.stderr + second.stdout


# --- the embed job ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """The tiny text tower with other weights: a model upgrade."""
    import torch
    from transformers import BertForSequenceClassification, BertTokenizer

    torch.manual_seed(1)
    text_dir, _ = tiny_models
    model = BertForSequenceClassification(BertForSequenceClassification.from_pretrained(text_dir).config)
    folder = tmp_path_factory.mktemp("upgraded") / "taiyi-text-v2"
    model.save_pretrained(folder)
    BertTokenizer.from_pretrained(text_dir).save_pretrained(folder)
    return folder


def test_an_embed_rerun_with_another_model_is_refused_and_overwrite_recomputes(local_ray, tiny_models,
                                                                                other_checkpoint, tmp_path):
    make_shards(tmp_path / "shards", 3, 4)
    out = tmp_path / "out"
    first = run_embed_job(job_config(tiny_models, f"{tmp_path}/shards/{{00000..00002}}.tar", str(out)))
    assert first["shards_committed"] == 3
    before = files_of(out / "embeddings")
    old_text = pq.read_table(out / "embeddings" / "00000.parquet").column("text_embedding").to_pylist()

    upgraded = job_config(tiny_models, f"{tmp_path}/shards/{{00000..00001}}.tar", str(out),
                          f"model.text={other_checkpoint}")
    with pytest.raises(ValueError, match=rf"text_model: \"{tiny_models[0]}\" in the output, "
                                         rf"\"{other_checkpoint}\" now.*overwrite=true"):
        run_embed_job(upgraded)
    assert files_of(out / "embeddings") == before  # no table of the new model beside the old ones

    same = run_embed_job(job_config(tiny_models, f"{tmp_path}/shards/{{00000..00002}}.tar", str(out)))
    assert same["shards_skipped_already_committed"] == 3 and files_of(out / "embeddings") == before

    redone = run_embed_job(job_config(tiny_models, f"{tmp_path}/shards/{{00000..00001}}.tar", str(out),
                                      f"model.text={other_checkpoint}", "overwrite=true"))
    assert redone["shards_committed"] == 2
    # every table left is the new model's: the one outside the new input went with the old settings
    assert sorted(p.name for p in (out / "embeddings").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    for path in (out / "embeddings").glob("*.parquet"):
        assert json.loads(pq.read_schema(path).metadata[b"taiyi_embed"])["text_model"] == str(other_checkpoint)
    assert pq.read_table(out / "embeddings" / "00000.parquet").column("text_embedding").to_pylist() != old_text
    assert json.loads((out / "_settings.json").read_text())["text_model"] == str(other_checkpoint)


def test_a_rerun_with_nothing_to_do_reports_what_the_output_holds(local_ray, tiny_models, tmp_path):
    """All shards already committed: the summary still says the tables were made with random weights."""
    from pipeline.embed.plan import embed_settings
    from pipeline.embed.preprocess import resolve_tokenizer
    from pipeline.io import settings

    make_shards(tmp_path / "shards", 1, 2)
    cfg = job_config(tiny_models, f"{tmp_path}/shards/00000.tar", str(tmp_path / "out"), "model.random_weights=true")
    settings.record(cfg.output, cfg.storage, embed_settings(cfg, True, resolve_tokenizer(cfg, True)))
    (tmp_path / "out" / "embeddings").mkdir()
    pq.write_table(embedding_table_schema().empty_table(), tmp_path / "out" / "embeddings" / "00000.parquet")
    summary = run_embed_job(cfg)
    assert summary["shards_skipped_already_committed"] == 1 and summary["shards_committed"] == 0
    assert summary["random_weights"] is True and summary["output_settings"]["random_weights"] is True


def test_an_output_from_before_recorded_settings_is_checked_against_its_tables(tiny_models, tmp_path):
    """Tables committed by an earlier version (no _settings.json): the same models resume, whatever path the
    old checkout's bundled vocab had; another model is refused."""
    from pipeline.embed.plan import plan_embed_run
    from pipeline.io.schema import file_metadata

    make_shards(tmp_path / "shards", 1, 2)
    cfg = job_config(tiny_models, f"{tmp_path}/shards/00000.tar", str(tmp_path / "out"), "model.random_weights=true")
    (tmp_path / "out" / "embeddings").mkdir(parents=True)
    old_meta = {**file_metadata(cfg, True, "/old/checkout/pipeline/data")}  # as the old version wrote it
    pq.write_table(embedding_table_schema("float16", old_meta).empty_table(),
                   tmp_path / "out" / "embeddings" / "00000.parquet")
    plan = plan_embed_run(cfg)
    assert plan.committed == {"00000"} and plan.todo == []
    other = job_config(tiny_models, f"{tmp_path}/shards/00000.tar", str(tmp_path / "out"), "model.random_weights=true",
                       f"model.image={tiny_models[0]}")
    with pytest.raises(ValueError, match=r"holds tables made with other settings \(image_model: "):
        plan_embed_run(other)


# --- start-up mistakes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("typo", ["demo_data/shard/00000.tar",        # a folder that does not exist
                                  "demo_data/shards/0000.tar",        # the folder exists, the file does not
                                  "demo_data/nope/*.tar"])
def test_the_demo_never_makes_up_data_for_a_mistyped_input(tmp_path, typo):
    (tmp_path / "demo_data" / "shards").mkdir(parents=True)
    result = run_job("embed_wukong.py", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"input={typo}",
                     "--set", f"output={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("config error: input", "storage error: input")), last
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr + result.stdout
    assert not list((tmp_path / "demo_data").rglob("*.tar"))  # no made-up shards anywhere
    assert not (tmp_path / "out").exists()


def test_a_production_config_offline_fails_fast_naming_the_model_and_the_download_command(tmp_path):
    make_shards(tmp_path / "shards", 1, 2)
    result = run_job("embed_wukong.py", "--config", str(REPO / "configs" / "wukong.yaml"),
                     "--set", f"input={tmp_path}/shards/00000.tar", "--set", f"output={tmp_path / 'out'}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: cannot load model weights for IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese")
    assert "hf download NAME --local-dir DIR" in last and "huggingface-cli" not in last
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr + result.stdout


def test_dry_runs_say_what_would_happen_and_start_nothing(tiny_models, tmp_path):
    make_shards(tmp_path / "shards", 3, 2)
    text, image = tiny_models
    common = ["--set", f"model.text={text}", "--set", f"model.image={image}", "--set", "encoder.actors=2",
              "--set", "encoder.num_cpus=0.5", "--set", "read.num_cpus=0.5"]
    result = run_job("embed_wukong.py", "--config", str(REPO / "configs" / "demo.yaml"), "--dry-run",
                     "--set", f"input={tmp_path}/shards/*.tar", "--set", f"output={tmp_path / 'out'}", *common,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("dry run: ") + len("dry run: "):])
    assert report["shards_in_input"] == 3 and report["to_embed"] == 3 and report["already_committed"] == 0
    assert report["first_shards"][0].endswith("shards/00000.tar") and report["random_weights"] is False
    assert report["ray_resources"]["encode"]["actors"] == 2 and report["ray_resources"]["read"]["num_cpus"] == 0.5
    assert "Started a local Ray" not in result.stderr + result.stdout
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # the write-access probe leaves no file

    tables_with_similarities(tmp_path / "emb", [np.linspace(0, 1, 10, dtype=np.float32)] * 2)
    result = run_job("filter_pairs.py", "--config", str(REPO / "configs" / "filter.yaml"), "--dry-run",
                     "--set", f"embeddings={tmp_path / 'emb'}", "--set", f"output={tmp_path / 'filtered'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("dry run: ") + len("dry run: "):])
    assert report["tables"] == 2 and report["already_written"] == 0
    assert report["output_settings"]["rule"] == {"keep_top_fraction": 0.5}
    assert "Started a local Ray" not in result.stderr + result.stdout
    assert not [p for p in (tmp_path / "filtered").rglob("*") if p.is_file()]


def test_the_eval_command_runs_as_documented(tiny_models, tmp_path):
    make_shards(tmp_path / "shards", 1, 4)
    text, image = tiny_models
    result = run_job("eval_retrieval.py", "--config", str(REPO / "configs" / "eval.yaml"),
                     "--set", f"retrieval={tmp_path}/shards/00000.tar", "--set", f"output={tmp_path / 'metrics'}",
                     "--set", f"model.text={text}", "--set", f"model.image={image}", "--set", "encoder.actors=1",
                     "--set", "encoder.batch_size=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert metrics["retrieval"]["images"] == 4 and metrics["errors"]["samples"] == 0
    assert 0 <= metrics["retrieval"]["text_to_image_R@1"] <= 1 and metrics["retrieval"]["text_to_image_R@10"] == 1.0


def test_dedup_against_an_unfinished_filter_run_is_refused_before_ray(tmp_path):
    tables_with_similarities(tmp_path / "emb", [np.linspace(0, 1, 10, dtype=np.float32)] * 2)
    curated = tmp_path / "curated"  # a filter output whose run stopped after one of two keep-lists
    (curated / "keep").mkdir(parents=True)
    (curated / "summary.json").write_text(json.dumps({"embeddings": str(tmp_path / "emb")}))
    pq.write_table(pa.table({"key": ["0-1"]}), curated / "keep" / "00000.parquet")
    tables_with_similarities(tmp_path / "new", [np.linspace(0, 1, 10, dtype=np.float32)])
    result = run_job("filter_pairs.py", "--config", str(REPO / "configs" / "filter.yaml"),
                     "--set", f"embeddings={tmp_path / 'new'}", "--set", f"output={tmp_path / 'out'}",
                     "--set", "dedup_threshold=0.95", "--set", f"dedup_against=[{curated}]", cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: dedup_against: ") and "an unfinished filter run? Rerun it first." in last
    assert "Started a local Ray" not in result.stderr + result.stdout


def test_the_demo_writes_its_shards_at_its_own_path_only(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.embed.demo import DEMO_INPUT, make_demo_shards

    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.input == DEMO_INPUT
    monkeypatch.chdir(tmp_path)
    assert make_demo_shards(load_config(REPO / "configs" / "demo.yaml", ["input=elsewhere/{00000..00001}.tar"])) == []
    assert not (tmp_path / "elsewhere").exists()
    assert [p.name for p in make_demo_shards(demo)] == ["00000.tar", "00001.tar", "00002.tar"]


def test_two_fresh_caches_draw_byte_identical_random_weights(tmp_path, monkeypatch):
    """The README's demo figures are what a newcomer gets: the random weights do not depend on the machine's
    cache (with the same torch and transformers versions, which key the cache)."""
    from pipeline.embed.model import random_checkpoints

    drawn = []
    for cache in ("a", "b"):
        monkeypatch.setenv("TAIYI_EMBED_CACHE", str(tmp_path / cache))
        text, image = random_checkpoints()
        drawn.append({name: (Path(folder) / "model.safetensors").read_bytes()
                      for name, folder in (("text", text), ("image", image))})
    assert drawn[0]["text"] == drawn[1]["text"] and drawn[0]["image"] == drawn[1]["image"]
