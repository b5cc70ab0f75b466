"""The filter job: threshold and exact top-fraction rules, error rows dropped, byte-identical filtered shards."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import job_config, make_shards, sample_members
from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.embed.demo import write_tar_shard
from pipeline.embed.run import run_embed_job
from pipeline.io.schema import embedding_table_schema


def synthetic_tables(folder, similarities_per_shard, error_every=7):
    """Embedding tables in the embed job's schema with chosen similarities (every 7th row an error)."""
    schema = embedding_table_schema("float16")
    (folder / "embeddings").mkdir(parents=True)
    for s, similarities in enumerate(similarities_per_shard):
        n = len(similarities)
        status = ["error" if i % error_every == 3 else "ok" for i in range(n)]
        table = pa.table({
            "key": [f"{s}-{i}" for i in range(n)], "shard": [f"/nowhere/{s:05d}.tar"] * n,
            "caption": ["标题"] * n, "url": [None] * n, "status": status,
            "error": ["image_decode_failed: x" if st == "error" else None for st in status],
            "image_embedding": [None] * n, "text_embedding": [None] * n,
            "similarity": [None if st == "error" else float(v) for st, v in zip(status, similarities)],
            "position": list(range(n)), "warning": [None] * n,
        }, schema=schema)
        pq.write_table(table, folder / "embeddings" / f"{s:05d}.parquet")


def kept_rows(out):
    return {r["key"]: r["similarity"] for p in sorted((out / "keep").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()}


def filter_cfg(embeddings, out, *overrides):
    return load_filter_config(None, [f"embeddings={embeddings}", f"output={out}", "report=false", *overrides])


def test_config_needs_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one rule"):
        load_filter_config(None, ["embeddings=a", "output=b"])
    with pytest.raises(ValueError, match="exactly one rule"):
        load_filter_config(None, ["embeddings=a", "output=b", "min_similarity=0.2", "keep_top_fraction=0.3"])
    with pytest.raises(ValueError, match=r"keep_top_fraction: must be in \(0, 1\]"):
        load_filter_config(None, ["embeddings=a", "output=b", "keep_top_fraction=1.5"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_filter_config(None, ["embeddings=a", "output=b", "min_similarty=0.2"])


def test_a_rule_on_the_command_line_replaces_the_files_rule():
    repo_config = Path(__file__).resolve().parents[1] / "configs" / "filter.yaml"  # keeps a top fraction
    cfg = load_filter_config(repo_config, ["min_similarity=0.2"])
    assert (cfg.min_similarity, cfg.keep_top_fraction) == (0.2, None)
    cfg = load_filter_config(repo_config, ["keep_top_fraction=0.3"])
    assert (cfg.min_similarity, cfg.keep_top_fraction) == (None, 0.3)
    with pytest.raises(ValueError, match="exactly one rule"):  # both on the command line: still an error
        load_filter_config(repo_config, ["min_similarity=0.2", "keep_top_fraction=0.3"])


def test_absolute_threshold_drops_errors(local_ray, tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.uniform(-0.1, 0.5, 40).astype(np.float32) for _ in range(3)]
    synthetic_tables(tmp_path / "emb", shards)
    summary = run_filter_job(filter_cfg(tmp_path / "emb", tmp_path / "out", "min_similarity=0.2"))
    expected = {f"{s}-{i}": float(v) for s, sims in enumerate(shards) for i, v in enumerate(sims)
                if i % 7 != 3 and v >= np.float32(0.2)}
    assert kept_rows(tmp_path / "out") == pytest.approx(expected)
    assert summary["kept"] == len(expected) and summary["threshold"] == 0.2
    assert summary["errors"] == sum(1 for sims in shards for i in range(len(sims)) if i % 7 == 3)
    assert summary["errors_by_reason"] == {"image_decode_failed": summary["errors"]}
    assert sorted(p.name for p in (tmp_path / "out" / "keep").iterdir()) == ["00000.parquet", "00001.parquet",
                                                                            "00002.parquet"]


@pytest.mark.parametrize("fraction", [0.3, 0.05, 1.0, 0.123])
def test_top_fraction_is_the_exact_quantile(local_ray, tmp_path, fraction):
    rng = np.random.default_rng(1)
    # values packed into a narrow range, so many share a histogram bin: the refining pass must be exact
    shards = [(0.25 + rng.normal(0, 1e-4, 500)).astype(np.float32) for _ in range(4)]
    synthetic_tables(tmp_path / "emb", shards)
    summary = run_filter_job(filter_cfg(tmp_path / "emb", tmp_path / "out", f"keep_top_fraction={fraction}"))
    ok = np.sort(np.concatenate([s[[i % 7 != 3 for i in range(len(s))]] for s in shards]))[::-1]
    k = int(np.ceil(fraction * len(ok)))
    assert summary["threshold"] == pytest.approx(float(ok[k - 1]), abs=0)
    assert summary["kept"] == int((ok >= ok[k - 1]).sum()) == len(kept_rows(tmp_path / "out"))
    assert summary["kept"] == k + int((ok[k:] == ok[k - 1]).sum())  # pairs tied at the cut-off are kept too


def test_filtered_shards_hold_kept_samples_byte_for_byte(local_ray, tiny_models, tmp_path):
    make_shards(tmp_path / "shards", 2, 6)
    extra = sample_members("z1", "额外成员", 50) + [("z1.cls", b"7")]  # all members travel, not just jpg/txt
    members = list(tarfile.open(tmp_path / "shards" / "00001.tar"))
    write_tar_shard(tmp_path / "shards" / "00001.tar",
                    [(m.name, tarfile.open(tmp_path / "shards" / "00001.tar").extractfile(m).read())
                     for m in members] + extra + [("bad.jpg", b"junk"), ("bad.txt", "坏".encode())])
    run_embed_job(job_config(tiny_models, f"{tmp_path}/shards/*.tar", str(tmp_path / "emb")))
    cfg = filter_cfg(tmp_path / "emb", tmp_path / "out", "keep_top_fraction=0.5", "write_shards=true")
    summary = run_filter_job(cfg)
    kept = kept_rows(tmp_path / "out")
    assert "bad" not in kept and summary["kept"] == len(kept) >= 7

    for name in ("00000", "00001"):
        source = tarfile.open(tmp_path / "shards" / f"{name}.tar")
        filtered = tarfile.open(tmp_path / "out" / "shards" / f"{name}.tar")
        expected = [(m.name, source.extractfile(m).read()) for m in source if m.name.split(".")[0] in kept]
        got = [(m.name, filtered.extractfile(m).read()) for m in filtered]
        assert got == expected  # the same members, same order, byte-identical
    keys_in_shards = {m.name.split(".")[0] for n in ("00000", "00001")
                      for m in tarfile.open(tmp_path / "out" / "shards" / f"{n}.tar")}
    assert keys_in_shards == set(kept)

    # idempotent: a rerun leaves the same files
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = run_filter_job(cfg)
    assert again["shards_skipped_already_written"] == 2 and again["kept"] == summary["kept"]
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["kept"] == summary["kept"]


def members_of(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def test_damaged_sources_never_stop_the_curation_and_a_rerun_after_repair_completes_it(local_ray, tiny_models,
                                                                                      tmp_path):
    """Sources cut short, deleted or overwritten since they were embedded: every other table is done, each
    damaged one gets its keep-list and the kept samples that could be read, the summary names each problem,
    the job exits 1; once the sources are back, a rerun redoes just those and ends clean."""
    import subprocess
    import sys

    shards = make_shards(tmp_path / "shards", 4, 6)
    run_embed_job(job_config(tiny_models, f"{tmp_path}/shards/*.tar", str(tmp_path / "emb")))
    originals = {p.name: p.read_bytes() for p in shards}
    intact = originals["00000.tar"]
    cut = intact[: len(intact) // 2]  # ends inside a sample: the samples before it are whole
    (tmp_path / "shards" / "00000.tar").write_bytes(cut)
    (tmp_path / "shards" / "00001.tar").unlink()
    (tmp_path / "shards" / "00002.tar").write_bytes(b"not a tar at all" * 100)
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(repo / "jobs" / "filter_pairs.py"), "--config", str(repo / "configs" / "filter.yaml"),
               "--set", f"embeddings={tmp_path / 'emb'}", "--set", f"output={tmp_path / 'out'}",
               "--set", "keep_top_fraction=1.0", "--set", "write_shards=true", "--set", "ray_num_cpus=1"]
    damaged = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert damaged.returncode == 1, damaged.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["problems"]) == {"00000", "00001", "00002"}
    assert summary["problems"]["00000"].startswith("shard_truncated: ")
    assert summary["problems"]["00001"].startswith("shard_missing: ")
    assert summary["problems"]["00002"].startswith("shard_unreadable: ")
    for name in ("00000", "00001", "00002"):
        assert f"not done in full: {name}: " in damaged.stderr
    kept = kept_rows(tmp_path / "out")
    assert len(kept) == summary["kept"] == summary["ok"]  # every keep-list written, damaged sources too
    # the readable part of the cut shard: whole samples, byte for byte, and at least one of them
    readable = []
    with tarfile.open(fileobj=__import__("io").BytesIO(cut), mode="r|") as src:
        try:
            for m in src:
                readable.append((m.name, src.extractfile(m).read()))
        except tarfile.ReadError:
            pass
    got = members_of(tmp_path / "out" / "shards" / "00000.tar")
    keys = {name.split(".")[0] for name, _ in got}
    assert got and set(got) <= set(readable)
    assert all(sum(n.split(".")[0] == k for n, _ in got) == 3 for k in keys)  # jpg, txt, json: whole samples
    assert members_of(tmp_path / "out" / "shards" / "00003.tar") == members_of(shards[3])

    for name, payload in originals.items():  # the sources are repaired
        (tmp_path / "shards" / name).write_bytes(payload)
    repaired = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == {}
    line = next(l for l in repaired.stdout.splitlines() if l.startswith("summary: "))
    assert json.loads(line[len("summary: "):])["shards_skipped_already_written"] == 1  # only 00003 was whole
    for path in shards:
        assert members_of(tmp_path / "out" / "shards" / path.name) == members_of(path)
    assert not list((tmp_path / "out").glob("incomplete/*"))


def test_an_unreadable_embeddings_table_is_named_and_the_others_are_filtered(local_ray, tmp_path):
    rng = np.random.default_rng(3)
    synthetic_tables(tmp_path / "emb", [rng.uniform(0, 1, 30).astype(np.float32) for _ in range(3)])
    table = tmp_path / "emb" / "embeddings" / "00001.parquet"
    table.write_bytes(table.read_bytes()[:200])  # cut short after it was committed
    summary = run_filter_job(filter_cfg(tmp_path / "emb", tmp_path / "out", "keep_top_fraction=0.5"))
    assert list(summary["problems"]) == ["00001"] and summary["problems"]["00001"].startswith("table_unreadable: ")
    assert sorted(p.name for p in (tmp_path / "out" / "keep").iterdir()) == ["00000.parquet", "00002.parquet"]
    assert summary["pairs"] == 60 and summary["kept"] == len(kept_rows(tmp_path / "out"))
