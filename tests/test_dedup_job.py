"""Near-duplicates end to end: re-encoded copies of a photo in different shards, with different captions, go
through the embed job (tiny checkpoints), are grouped by the filter job, and show in the report's gallery."""

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import CAPTIONS, images_decoded_in_chromium, job_config, needs_chromium
from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.bench.dedup import repost
from pipeline.embed.demo import write_tar_shard
from pipeline.embed.run import run_embed_job
from pipeline.io.tables import image_vectors

# Chosen from measured cosines (the test asserts both sides). With the tiny checkpoint's image tower, the
# copies below measured >= 0.99975 of each other, distinct photos <= 0.9956 (torch 2.13 CPU).
THRESHOLD = 0.999


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A photo-like image: a smooth random colour field with sensor noise, different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(coarse).astype(float) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# shard -> samples (key, photo seed, copy); photos 1-3 are posted three or two times across shards, photo 9 is
# in the evaluation set (re-encoded), the rest once; "broken" is a truncated JPEG (an error row)
SHARDS = {
    "00000": [("a-q95", 1, "jpeg_q95"), ("b-q95", 2, "jpeg_q95"), ("u-10", 10, "jpeg_q95"), ("broken", None, None),
              ("u-11", 11, "jpeg_q95"), ("leak", 9, "jpeg_q95")],
    "00001": [("a-q60", 1, "jpeg_q60"), ("c-q95", 3, "jpeg_q95"), ("u-12", 12, "jpeg_q95"),
              ("b-resized", 2, "resized_75pct"), ("u-13", 13, "jpeg_q95")],
    "00002": [("a-crop", 1, "crop_2.5pct"), ("c-q60", 3, "jpeg_q60"), ("u-14", 14, "jpeg_q95"),
              ("b-crop", 2, "crop_2.5pct"), ("u-15", 15, "jpeg_q95")],
}
EVAL = [("ref-9", 9, "resized_75pct"), ("ref-20", 20, "jpeg_q95"), ("ref-21", 21, "jpeg_q95")]
GROUPS = [{"a-q95", "a-q60", "a-crop"}, {"b-q95", "b-resized", "b-crop"}, {"c-q95", "c-q60"}]


def write_shard(path, samples, caption_offset):
    members = []
    for i, (key, seed, how) in enumerate(samples):
        payload = repost(photo(99), "jpeg_q95")[:300] if seed is None else repost(photo(seed), how)
        members += [(f"{key}.jpg", payload), (f"{key}.txt", CAPTIONS[(caption_offset + i) % len(CAPTIONS)].encode())]
    write_tar_shard(path, members)


@pytest.fixture(scope="module")
def curated(local_ray, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup-job")
    for n, (name, samples) in enumerate(SHARDS.items()):
        write_shard(root / "shards" / f"{name}.tar", samples, 3 * n)
    write_shard(root / "eval" / "test-0.tar", EVAL, 5)
    run_embed_job(job_config(tiny_models, f"{root}/shards/*.tar", str(root / "emb")))
    run_embed_job(job_config(tiny_models, f"{root}/eval/*.tar", str(root / "eval-emb")))
    cfg = load_filter_config(None, [f"embeddings={root / 'emb'}", f"output={root / 'out'}", "min_similarity=-1",
                                    f"dedup_threshold={THRESHOLD}", f"dedup_against=[{root / 'eval-emb'}]",
                                    "write_shards=true", "gallery_per_band=4"])
    summary = run_filter_job(cfg)
    rows = {}
    for folder in ("emb", "eval-emb"):
        for path in sorted((root / folder / "embeddings").glob("*.parquet")):
            table = pq.read_table(path)
            vectors = image_vectors(table.select(["image_embedding"]).filter(
                table.column("status").to_numpy(zero_copy_only=False) == "ok"))
            ok = [r for r in table.select(["key", "shard", "status", "similarity"]).to_pylist() if r["status"] == "ok"]
            rows.update({r["key"]: {**r, "vector": v / np.linalg.norm(v)} for r, v in zip(ok, vectors)})
    return root, summary, rows


def test_copies_are_closer_than_the_threshold_and_distinct_photos_are_not(curated):
    _, _, rows = curated
    seeds = {key: seed for samples in [*SHARDS.values(), EVAL] for key, seed, _ in samples if seed is not None}
    same, different = [], []
    keys = sorted(rows)
    for i, x in enumerate(keys):
        for y in keys[i + 1:]:
            cosine = float(rows[x]["vector"] @ rows[y]["vector"])
            (same if seeds[x] == seeds[y] else different).append(cosine)
    assert len(same) == 3 + 3 + 1 + 1  # a, b: 3 pairs each; c: 1; the leak and its reference: 1
    assert min(same) >= THRESHOLD > max(different), (min(same), max(different))


def test_each_group_keeps_its_best_caption(curated):
    root, summary, rows = curated
    dropped = {}
    for name in SHARDS:
        for r in pq.read_table(root / "out" / "duplicates" / f"{name}.parquet").to_pylist():
            assert r["shard"].endswith(f"/{name}.tar")
            dropped[r["key"]] = r
    for group in GROUPS:
        best = max(group, key=lambda k: rows[k]["similarity"])
        for key in group - {best}:
            r = dropped.pop(key)
            assert (r["reason"], r["match_key"], r["match_shard"]) == ("near_duplicate", best, rows[best]["shard"])
            assert r["cosine"] == pytest.approx(float(rows[key]["vector"] @ rows[best]["vector"]), abs=1e-4)
    leak = dropped.pop("leak")
    assert (leak["reason"], leak["match_key"]) == ("matches_reference", "ref-9")
    assert leak["match_shard"].endswith("/eval/test-0.tar")
    assert dropped == {}  # nothing else: not the unique photos, not the error row

    kept = {r["key"] for name in SHARDS for r in pq.read_table(root / "out" / "keep" / f"{name}.parquet").to_pylist()}
    winners = {max(group, key=lambda k: rows[k]["similarity"]) for group in GROUPS}
    assert kept == winners | {"u-10", "u-11", "u-12", "u-13", "u-14", "u-15"}
    shard_keys = set()
    for name in SHARDS:
        with tarfile.open(root / "out" / "shards" / f"{name}.tar") as tar:
            shard_keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    assert shard_keys == kept  # the filtered shards hold exactly the kept pairs
    assert (summary["duplicates"]["near_duplicate"], summary["duplicates"]["matches_reference"],
            summary["duplicates"]["groups"]) == (5, 1, 3)
    assert summary["errors"] == 1 and summary["kept"] == 9
    assert json.loads((root / "out" / "summary.json").read_text())["duplicates"]["groups"] == 3


def test_report_gallery_of_groups_and_reference_matches(curated):
    root, _, rows = curated
    page = (root / "out" / "report" / "index.html").read_text()
    bands, section = page.split("<h2>Near-duplicates</h2>")
    # the similarity bands show what the rule did to the survivors: no pair dedup dropped
    dropped = {"leak"} | {k for g in GROUPS for k in g if k != max(g, key=lambda k: rows[k]["similarity"])}
    assert bands.count("<figure") == 12 and not any(f"<small>{k}</small>" in bands for k in dropped)
    # every group's row: the kept pair first, then the dropped ones; then the leak beside its reference image
    for group in GROUPS:
        best = max(group, key=lambda k: rows[k]["similarity"])
        assert section.count(f"<small>{best}</small>") == 1
        row = section[section.rindex('<div class="band">', 0, section.index(f"<small>{best}</small>")):]
        row = row[:row.index("</div>", row.index("<figure"))]
        assert row.index(f"<small>{best}</small>") < min(row.index(f"<small>{k}</small>") for k in group - {best})
        assert row.count('<figure class="kept">') == 1 and row.count('<figure class="dropped">') == len(group) - 1
    assert section.count('<figure class="reference">') == 1 and "<small>ref-9</small>" in section
    assert section.count("<figure") == 3 + 3 + 2 + 2


@needs_chromium
def test_report_gallery_renders_in_headless_chromium(curated, tmp_path):
    root, _, _ = curated
    total, loaded = images_decoded_in_chromium(root / "out" / "report" / "index.html", tmp_path / "profile")
    assert total == 3 + 12 + 10 and loaded == total  # plots, similarity bands, the duplicate galleries
