"""Benchmark of the filter job's dedup: synthetic embedding tables with planted near-duplicates, searched on Ray.

The vectors imitate CLIP image embeddings: a shared direction (every pair of images has a positive cosine),
topic clusters (images of one topic at ~0.6) and per-image detail. A planted duplicate is a copy of an image
moved by a small random amount: its cosine to the original is spread over [0.93, 0.995], so some copies sit
below the threshold (brute force decides what counts). Copies land in random tables, as reposts do.

Figures: the filter job's wall time (dedup and the rest), peak memory of every process, and recall:
- planted: of the planted copies at cosine >= threshold to their original (exact, computed directly), the
  fraction the job grouped with it;
- subset: an exact brute-force search of a 50,000-pair subset (whole planted groups and random others) finds
  every pair at cosine >= threshold; the fraction of those the job put in one group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.embed.demo import encode_image
from pipeline.io.schema import EMBEDDING_DIM, embedding_table_schema

log = logging.getLogger(__name__)

TOPICS = 2000


def synthetic_vectors(pairs: int, copy_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors float32, the original row of each copy or -1)."""
    rng = np.random.default_rng(seed)
    copies = int(pairs * copy_fraction)
    originals = pairs - copies
    shared = rng.normal(size=EMBEDDING_DIM)
    shared /= np.linalg.norm(shared)
    topics = rng.normal(size=(TOPICS, EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM)
    vectors = np.empty((pairs, EMBEDDING_DIM), np.float32)
    for start in range(0, originals, 100_000):
        n = min(100_000, originals - start)
        chunk = (0.6 * shared + topics[rng.integers(0, TOPICS, n)]
                 + rng.normal(size=(n, EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM))
        vectors[start:start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    # copies: 1 to 3 of a random original each
    source = np.repeat(rng.choice(originals, size=copies, replace=False), rng.integers(1, 4, copies))[:copies]
    target = rng.uniform(0.93, 0.995, copies)
    noise = rng.normal(size=(copies, EMBEDDING_DIM)).astype(np.float32)
    noise -= np.sum(noise * vectors[source], axis=1, keepdims=True) * vectors[source]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors[originals:] = target[:, None] * vectors[source] + np.sqrt(1 - target ** 2)[:, None] * noise
    original_of = np.concatenate([np.full(originals, -1), source])
    order = rng.permutation(pairs)  # copies land anywhere
    inverse = np.argsort(order)
    original_of = original_of[order]
    original_of[original_of >= 0] = inverse[original_of[original_of >= 0]]
    return vectors[order], original_of


# what the synthetic tables say made them: the real architectures with random weights, so that concept queries
# are embedded by a tower of the real size (their cosines mean nothing; the benchmark measures time and memory)
SYNTHETIC_MODELS = {"text_model": "IDEA-CCNL/Taiyi-CLIP-Roberta-102M-Chinese", "text_revision": None,
                    "image_model": "openai/clip-vit-base-patch32", "image_revision": None, "tokenizer": None,
                    "random_weights": True}
# 30 curation queries: 10 concepts of 3 queries each
CONCEPT_QUERIES = [["水印", "水印文字", "图片水印"], ["二维码", "扫码", "条形码"], ["文字截图", "聊天截图", "网页截图"],
                   ["广告", "促销海报", "商品广告"], ["表情包", "搞笑表情", "动图"], ["美食", "菜肴", "餐厅"],
                   ["风景", "山水", "自然风光"], ["商品", "产品图", "电商主图"], ["证件照", "身份证", "证件"],
                   ["裸露", "色情", "暴力"]]


def write_tables(folder: Path, vectors: np.ndarray, per_table: int, seed: int) -> list[str]:
    """Embed-job tables (float16 embeddings) of `per_table` rows each; keys are the global row numbers."""
    rng = np.random.default_rng(seed + 1)
    schema = embedding_table_schema("float16", SYNTHETIC_MODELS)
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    text = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(EMBEDDING_DIM, np.float16)), EMBEDDING_DIM)
    shards = []
    for t, start in enumerate(range(0, len(vectors), per_table)):
        n = min(per_table, len(vectors) - start)
        shard = f"s3://synthetic/wukong/{t:05d}.tar"
        image = pa.FixedSizeListArray.from_arrays(pa.array(vectors[start:start + n].astype(np.float16).ravel()),
                                                  EMBEDDING_DIM)
        columns = {
            "key": pa.array([str(start + i) for i in range(n)]), "shard": pa.array([shard] * n),
            "caption": pa.nulls(n, pa.string()), "url": pa.nulls(n, pa.string()), "status": pa.array(["ok"] * n),
            "error": pa.nulls(n, pa.string()), "image_embedding": image,
            "text_embedding": pa.repeat(text[0], n).cast(schema.field("text_embedding").type),
            "similarity": pa.array(rng.normal(0.2, 0.05, n).astype(np.float32)),
            "position": pa.array(np.arange(n, dtype=np.int64)), "warning": pa.nulls(n, pa.string()),
        }
        pq.write_table(pa.table(columns, schema=schema), folder / "embeddings" / f"{t:05d}.parquet")
        shards.append(shard)
    return shards


def read_vectors(folder: Path) -> np.ndarray:
    """Every row's image vector as the dedup stage sees it: read back from float16 and normalised again."""
    from pipeline.curate.dedup import normalized
    from pipeline.io.tables import image_vectors

    return np.concatenate([normalized(image_vectors(pq.read_table(path, columns=["image_embedding"])))
                           for path in sorted((folder / "embeddings").glob("*.parquet"))])


def group_of_rows(output: Path, pairs: int) -> np.ndarray:
    """Per row, the row of the pair its group kept (itself when kept); reference matches are not counted here."""
    group = np.arange(pairs)
    for path in sorted((output / "duplicates").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "reason", "match_key"]).to_pydict()
        for key, reason, match in zip(table["key"], table["reason"], table["match_key"]):
            if reason == "near_duplicate":
                group[int(key)] = int(match)
    return group


def subset_recall(stored: np.ndarray, original_of: np.ndarray, group: np.ndarray, threshold: float,
                  size: int, seed: int) -> dict:
    """Brute force on `size` rows: half from whole planted groups, half at random."""
    rng = np.random.default_rng(seed + 2)
    copies = np.flatnonzero(original_of >= 0)
    picked = rng.choice(copies, size=min(len(copies), size // 4), replace=False)
    chosen = np.zeros(len(stored), bool)
    chosen[picked] = chosen[original_of[picked]] = True
    others = rng.permutation(len(stored))
    others = others[~chosen[others]][: max(0, size - int(chosen.sum()))]
    chosen[others] = True
    rows = np.flatnonzero(chosen)
    sub = stored[rows]
    exact = found = 0
    for start in range(0, len(rows), 2048):
        scores = sub[start:start + 2048] @ sub.T
        i, j = np.nonzero(scores >= threshold)
        i += start
        upper = i < j
        i, j = rows[i[upper]], rows[j[upper]]
        exact += len(i)
        found += int(np.sum(group[i] == group[j]))
    return {"rows": len(rows), "pairs_at_threshold": exact, "grouped_by_job": found,
            "recall": round(found / exact, 5) if exact else None}


def run_dedup_benchmark(folder: Path, pairs: int, per_table: int, threshold: float | None, partition_size: int,
                        probes: int, subset: int, num_cpus: int | None, seed: int = 0, concepts: int = 0) -> dict:
    """The filter job on synthetic tables: dedup at `threshold` (None: no dedup), and `concepts` concept rules of
    3 queries each (drop at cosine >= 0.1)."""
    import ray

    from pipeline.bench.samplers import MemorySampler, machine
    from pipeline.curate.run import load_filter_config, run_filter_job

    started = time.monotonic()
    vectors, original_of = synthetic_vectors(pairs, 0.1, seed)
    write_tables(folder / "emb", vectors, per_table, seed)
    del vectors  # the job's memory is measured: this process holds only the planted copies' origins
    log.info("%d synthetic pairs (%d planted copies) written to %s in %.0f s", pairs, int(np.sum(original_of >= 0)),
             folder, time.monotonic() - started)

    ray.init(num_cpus=num_cpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        rules = [{"name": f"c{i}", "queries": CONCEPT_QUERIES[i % len(CONCEPT_QUERIES)], "action": "drop",
                  "threshold": 0.1} for i in range(concepts)]
        cfg = load_filter_config(None, [
            f"embeddings={folder / 'emb'}", f"output={folder / 'out'}", "min_similarity=-1", "report=false",
            f"dedup_threshold={'null' if threshold is None else threshold}", f"dedup_partition_size={partition_size}",
            f"dedup_probes={probes}", "overwrite=true", f"concepts={json.dumps(rules, ensure_ascii=False)}"])
        with MemorySampler(interval_s=1.0) as memory:
            t0 = time.monotonic()
            summary = run_filter_job(cfg)
            wall_s = time.monotonic() - t0
    finally:
        ray.shutdown()
    common = {
        "machine": machine(), "pairs": pairs, "tables": -(-pairs // per_table), "wall_s": round(wall_s, 1),
        "peak_memory_gib_all_processes_pss": round(memory.peak_bytes / 2**30, 2),
        "peak_rss_gib_largest_process": round(max(memory.peak_rss.values()) / 2**30, 2),
        "largest_process": memory.names.get(max(memory.peak_rss, key=memory.peak_rss.get)),
        "peak_rss_gib_driver": round(memory.peak_rss.get(os.getpid(), 0) / 2**30, 2),
    }
    if concepts:
        common["concepts"] = {"rules": concepts, "queries": sum(len(r["queries"]) for r in rules),
                              "concepts_s": summary["concepts_s"],
                              "dropped": {r["name"]: r["dropped"] for r in summary["concepts"]["rules"]}}
    if threshold is None:
        return common
    group = group_of_rows(folder / "out", pairs)
    stored = read_vectors(folder / "emb")
    copies = np.flatnonzero(original_of >= 0)
    planted_cos = np.sum(stored[copies] * stored[original_of[copies]], axis=1)
    expected = copies[planted_cos >= threshold]
    planted_found = int(np.sum(group[expected] == group[original_of[expected]]))
    subset_figures = subset_recall(stored, original_of, group, threshold, subset, seed)
    return {
        **common, "threshold": threshold,
        "dedup_partition_size": partition_size, "dedup_probes": probes, "search": summary["duplicates"]["search"],
        "dedup_s": summary["dedup_s"], "groups": summary["duplicates"]["groups"],
        "near_duplicates_dropped": summary["duplicates"]["near_duplicate"],
        "planted": {"copies": len(copies), "at_threshold": len(expected), "grouped_by_job": planted_found,
                    "recall": round(planted_found / len(expected), 5) if len(expected) else None},
        "subset": subset_figures,
    }


# ---- how far apart copies of one picture are: a guide for choosing dedup_threshold ----

def repost(image: Image.Image, how: str) -> bytes:
    """One picture as the web reposts it: re-encoded, downsized, cropped a little, or watermarked."""
    w, h = image.size
    if how == "jpeg_q95":
        return encode_image(image, "JPEG", quality=95)
    if how == "jpeg_q60":
        return encode_image(image, "JPEG", quality=60)
    if how == "resized_75pct":
        return encode_image(image.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC), "JPEG", quality=85)
    if how == "resized_50pct":
        return encode_image(image.resize((w // 2, h // 2), Image.Resampling.BICUBIC), "JPEG", quality=85)
    if how == "crop_2.5pct":
        return encode_image(image.crop((w // 40, h // 40, w - w // 40, h - h // 40)), "JPEG", quality=90)
    if how == "crop_10pct":
        return encode_image(image.crop((w // 10, h // 10, w - w // 10, h - h // 10)), "JPEG", quality=90)
    if how == "watermark":
        marked = image.copy()
        draw = ImageDraw.Draw(marked)
        draw.rectangle((int(w * 0.6), int(h * 0.88), w - 4, h - 4), fill=(255, 255, 255))
        draw.text((int(w * 0.62), int(h * 0.89)), "@wukong.example 转载", fill=(90, 90, 90))
        return encode_image(marked, "JPEG", quality=90)
    raise ValueError(f"unknown repost: {how}")


REPOSTS = ["jpeg_q60", "resized_75pct", "resized_50pct", "crop_2.5pct", "crop_10pct", "watermark"]


def copy_cosines(cfg, photos: int, seed: int = 0) -> dict:
    """Image cosines of reposted copies to their original (saved at quality 95), per kind of repost, and of
    distinct photos to each other, through the configured image tower (random weights when so configured or
    unreachable: labelled)."""
    import torch

    from pipeline.bench.photos import photo_like
    from pipeline.embed.demo import real_photographs
    from pipeline.embed.encode import Encoder
    from pipeline.embed.model import decide_random_weights
    from pipeline.embed.image import decode_image

    random_weights = decide_random_weights(cfg)
    torch.manual_seed(seed)
    encoder = Encoder(cfg, random_weights=random_weights, texts=False)
    rng = np.random.default_rng(seed)
    originals = [p for p, _ in real_photographs()] + [photo_like(rng, []) for _ in range(photos - 2)]
    size, max_pixels = cfg.read.image_size, cfg.read.max_image_pixels

    def embed(payloads: list[bytes]) -> np.ndarray:
        pixels = np.stack([decode_image(p, size, max_pixels) for p in payloads])
        return encoder.embed_images(pixels).cpu().numpy()  # batch by batch (Encoder.at_fixed_shape)

    base = embed([repost(p, "jpeg_q95") for p in originals])
    figures = {"weights": "RANDOM (default init) of the real architectures" if random_weights else "trained",
               "image_model": cfg.model.image, "photos": len(originals), "copies": {}}
    for how in REPOSTS:
        cosines = np.sum(embed([repost(p, how) for p in originals]) * base, axis=1)
        figures["copies"][how] = {"min": round(float(cosines.min()), 5),
                                  "p5": round(float(np.percentile(cosines, 5)), 5),
                                  "median": round(float(np.median(cosines)), 5)}
    distinct = (base @ base.T)[np.triu_indices(len(base), 1)]
    figures["distinct_photos"] = {"median": round(float(np.median(distinct)), 5),
                                  "p99": round(float(np.percentile(distinct, 99)), 5),
                                  "max": round(float(distinct.max()), 5)}
    return figures
