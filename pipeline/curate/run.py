"""Curation: pick a similarity threshold (absolute, or the exact top fraction), write keep-lists and filtered shards.

Reads the embed job's committed tables `{embeddings}/embeddings/*.parquet`, one Ray task per table. Order:
dedup (dedup.py), then the concept rules (concepts.py), then the similarity rule on what they left. The exact
quantile is found in two distributed passes over the similarity column: a fine histogram
locates the bin that holds the cut-off rank, then only that bin's values are gathered and sorted.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.io import storage, tables
from pipeline.config import StorageCfg, build_config, validate_positive
from pipeline.curate.concepts import (ORDER, ConceptCfg, apply_concepts, concept_dropped_positions, embed_queries,
                                     merge_galleries, query_models, removed_before_rule, validate_concepts)
from pipeline.curate.dedup import MATCHES_REFERENCE, NEAR_DUPLICATE, find_duplicates, reference_tables
from pipeline.curate.plan import FilterPlan, plan_filter_run, take_over_output
from pipeline.embed.image import without_addresses
from pipeline.embed.read import positioned_members
from pipeline.io.schema import STATUS_OK

log = logging.getLogger(__name__)

KEEP_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("similarity", pa.float32())])
HISTOGRAM_BINS = 1 << 16  # over [-1, 1]: bins of 3e-5, so the refining pass gathers few values
REPORT_BINS = 200  # 0.01 wide over [-1, 1]: CLIP scores crowd into a narrow range


@dataclass(frozen=True)
class FilterCfg:
    # the embed job's `output` folder (holds embeddings/*.parquet)
    embeddings: str = ""
    # folder for keep/*.parquet, shards/*.tar, duplicates/ and concepts/ drops, summary.json and report/
    output: str = ""
    # keep ok pairs with similarity >= this (model-specific: measure on your data; see README)
    min_similarity: float | None = None
    # or keep the top fraction of ok pairs by similarity, in (0, 1], cut at the exact quantile
    keep_top_fraction: float | None = None
    # also write filtered WebDataset shards holding every member of the kept samples, byte for byte
    write_shards: bool = False
    # rewrite outputs that exist (default: a rerun skips shards already written, giving the same files)
    overwrite: bool = False
    # build the HTML report with plots and a gallery
    report: bool = True
    # thumbnails per similarity band in the report's gallery
    gallery_per_band: int = 8
    # near-duplicate images: ok pairs whose image embeddings have cosine >= this, in (0, 1], form groups and
    # each group keeps its highest-similarity pair (pipeline/curate/dedup.py); null: off. Applied before the rule.
    dedup_threshold: float | None = None
    # embed job output folders (e.g. evaluation sets): ok pairs whose image has cosine >= dedup_threshold
    # with one of theirs are dropped
    dedup_against: list[str] = field(default_factory=list)
    # ok pairs per exact-search partition; inputs of at most this many ok pairs are searched exactly
    dedup_partition_size: int = 50_000
    # partitions each pair is assigned to beyond that size: more find more duplicates, with more work
    dedup_probes: int = 2
    # rules by meaning, applied after dedup and before the similarity rule (pipeline/curate/concepts.py): each
    # {name, queries: [text, ...], action: drop | keep_only, threshold: cosine of image and query}
    concepts: list[ConceptCfg] = field(default_factory=list)
    # only embed the concepts' queries and write concepts_preview/index.html (galleries per concept): nothing
    # else is written, so thresholds can be chosen by looking before a run applies them
    concepts_dry_run: bool = False
    # CPUs per filtering task
    num_cpus: float = 0.5
    storage: StorageCfg = field(default_factory=StorageCfg)
    # cluster address; null = RAY_ADDRESS or a local Ray
    ray_address: str | None = None
    # CPUs of a local Ray
    ray_num_cpus: int | None = None


def load_filter_config(path, overrides=()) -> FilterCfg:
    from pipeline.config import read_raw

    # a rule given on the command line replaces the file's rule
    cfg = build_config(FilterCfg, read_raw(path, overrides, exclusive=(("min_similarity", "keep_top_fraction"),)), "")
    if not cfg.embeddings or not cfg.output:
        raise ValueError("embeddings and output: required (the embed job's output folder, and a folder for ours)")
    if (cfg.min_similarity is None) == (cfg.keep_top_fraction is None):
        raise ValueError("set exactly one rule: min_similarity or keep_top_fraction")
    if cfg.min_similarity is not None and not -1.0 <= cfg.min_similarity <= 1.0:
        raise ValueError(f"min_similarity: a cosine, in [-1, 1]; got {cfg.min_similarity}")
    if cfg.keep_top_fraction is not None and not 0.0 < cfg.keep_top_fraction <= 1.0:
        raise ValueError(f"keep_top_fraction: must be in (0, 1], got {cfg.keep_top_fraction}")
    validate_positive({"gallery_per_band": cfg.gallery_per_band, "num_cpus": cfg.num_cpus,
                       "dedup_probes": cfg.dedup_probes, "dedup_partition_size": cfg.dedup_partition_size})
    if cfg.dedup_threshold is not None and not 0.0 < cfg.dedup_threshold <= 1.0:
        raise ValueError(f"dedup_threshold: a cosine in (0, 1], or null for no dedup; got {cfg.dedup_threshold}")
    if cfg.dedup_against and cfg.dedup_threshold is None:
        raise ValueError("dedup_against: needs dedup_threshold (the cosine at which an image matches a reference)")
    validate_concepts(cfg.concepts)
    if cfg.concepts_dry_run and not cfg.concepts:
        raise ValueError("concepts_dry_run: needs concepts (the rules whose galleries it shows)")
    return cfg


def survivors(url: str, cfg: FilterCfg, columns: list[str]) -> tuple[pa.Table, pa.Array]:
    """One table's `columns` and the mask of its ok pairs that dedup and the concept rules left (the
    similarity rule's candidates)."""
    table = tables.read_table(url, cfg.storage, list(dict.fromkeys([*columns, "position", "status"])))
    mask = pc.equal(table.column("status"), STATUS_OK)
    removed = removed_before_rule(cfg, tables.table_name(url))
    if removed:
        mask = pc.and_(mask, pc.invert(pc.is_in(table.column("position"), value_set=pa.array(sorted(removed),
                                                                                             pa.int64()))))
    return table, mask


def _candidate_similarities(url: str, cfg: FilterCfg) -> np.ndarray:
    table, mask = survivors(url, cfg, ["similarity"])
    return table.filter(mask).column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)


def _bin_of(values: np.ndarray) -> np.ndarray:
    return np.clip(((values + 1.0) / 2.0 * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)


def exact_top_threshold(files: list[str], cfg: FilterCfg) -> tuple[float, int, int]:
    """(cut-off, kept, ok pairs): the similarity of the k-th highest ok pair, k = ceil(fraction * n).

    Ties at the cut-off are kept together, so `kept` may exceed k when pairs share that exact score.
    """
    files_ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))

    def histogram(batch):
        counts = np.zeros(HISTOGRAM_BINS, np.int64)
        for url in batch["file"]:
            np.add.at(counts, _bin_of(_candidate_similarities(url, cfg)), 1)
        return {"counts": [counts]}

    counts = np.sum(np.stack(list(files_ds.map_batches(histogram, batch_size=1, num_cpus=cfg.num_cpus)
                                  .to_pandas()["counts"])), axis=0)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no ok pairs in the embeddings: nothing to rank")
    k = max(1, math.ceil(cfg.keep_top_fraction * total))
    from_top = np.cumsum(counts[::-1])
    target_bin = HISTOGRAM_BINS - 1 - int(np.searchsorted(from_top, k))
    above = int(counts[target_bin + 1:].sum())

    def values_in_bin(batch):
        values = np.concatenate([_candidate_similarities(url, cfg) for url in batch["file"]])
        return {"values": [values[_bin_of(values) == target_bin]]}

    in_bin = np.sort(np.concatenate(list(files_ds.map_batches(values_in_bin, batch_size=1, num_cpus=cfg.num_cpus)
                                         .to_pandas()["values"])))[::-1]
    threshold = float(in_bin[k - above - 1])
    kept = above + int((in_bin >= threshold).sum())
    return threshold, kept, total


@dataclass
class ShardResult:
    shard: str
    name: str
    rows: int = 0
    ok: int = 0
    kept: int = 0
    duplicates: int = 0
    concept_dropped: int = 0
    errors_by_reason: dict = field(default_factory=dict)
    histogram: list = field(default_factory=list)
    skipped: bool = False
    problem: str | None = None  # what could not be done in full (a damaged source or table)


def filter_table(url: str, threshold: float, cfg: FilterCfg) -> dict:
    """One embedding table: its keep-list (and filtered shard), atomically, unless already written in full.

    A source shard damaged since it was embedded (missing, not a tar, cut short) still gets its keep-list and a
    filtered shard of the kept samples that could be read; the problem is returned and recorded in
    `incomplete/{name}.json`, so that a rerun after the source is repaired does this table again."""
    name = tables.table_name(url)
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    keep_path = storage.join(out, "keep", f"{name}.parquet")
    marker = storage.join(out, "incomplete", f"{name}.json")
    try:
        table, candidates = survivors(url, cfg, ["key", "shard", "position", "status", "error", "similarity"])
    except (OSError, pa.ArrowException) as exc:  # readable when the run began, not now
        return ShardResult(shard=url, name=name, problem=f"table_unreadable: {exc}").__dict__
    ok_mask = pc.equal(table.column("status"), STATUS_OK)
    keep_mask = pc.and_(candidates, pc.greater_equal(table.column("similarity"), pa.scalar(threshold, pa.float32())))
    kept = table.filter(keep_mask)
    similarities = table.filter(ok_mask).column("similarity").to_numpy(zero_copy_only=False)
    concept_dropped = len(concept_dropped_positions(cfg.output, name, cfg.storage)) if cfg.concepts else 0
    result = ShardResult(
        shard=table.column("shard")[0].as_py() if table.num_rows else url, name=name, rows=table.num_rows,
        ok=len(similarities), kept=kept.num_rows, concept_dropped=concept_dropped,
        duplicates=len(similarities) - pc.sum(candidates).as_py() - concept_dropped,
        errors_by_reason=dict(collections.Counter(e.split(":", 1)[0] for e in table.column("error").to_pylist() if e)),
        histogram=np.histogram(similarities, bins=REPORT_BINS, range=(-1, 1))[0].tolist())
    if fs.exists(keep_path) and not fs.exists(marker) and not cfg.overwrite:
        result.skipped = True
        return result.__dict__
    if cfg.write_shards and table.num_rows:
        kept_keys = set(kept.column("key").to_pylist())
        positions = set(kept.column("position").to_pylist())
        payload, result.problem = filtered_shard(result.shard, kept_keys, positions, cfg.storage)
        storage.write_atomically(fs, storage.join(out, "shards", f"{name}.tar"), payload)
    if result.problem:
        storage.write_atomically(fs, marker, json.dumps({"shard": result.shard, "problem": result.problem}).encode())
    sink = io.BytesIO()
    pq.write_table(kept.select(KEEP_SCHEMA.names).cast(KEEP_SCHEMA), sink)
    storage.write_atomically(fs, keep_path, sink.getvalue())  # after the shard: its presence marks the table done
    if not result.problem and fs.exists(marker):
        fs.rm(marker)  # repaired: done in full now
    return result.__dict__


def filtered_shard(shard_url: str, keep_keys: set[str], keep_positions: set[int],
                   storage_cfg: StorageCfg) -> tuple[bytes, str | None]:
    """A tar of every member of the kept samples, copied byte for byte with their headers, in shard order, and
    the problem if the source could not be read in full (then the tar holds the kept samples read whole).

    Samples are counted as the reader counts them (consecutive members with one key), so a repeated key
    keeps only the occurrence that was embedded and kept."""
    fs, path = storage.filesystem(shard_url, storage_cfg)
    sink, written, read_any = io.BytesIO(), 0, False
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as dst:
        sample, members = None, []  # a sample is written whole or not at all
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as src:
                for position, key, _, member in positioned_members(src):
                    read_any = True
                    if position != sample:
                        written += flush(dst, members)
                        sample, members = position, []
                    if key in keep_keys and position in keep_positions:
                        members.append((member, src.extractfile(member).read()))
            written += flush(dst, members)
            return sink.getvalue(), None
        except FileNotFoundError:
            problem = f"shard_missing: {shard_url} does not exist"
        except (OSError, EOFError, tarfile.TarError) as exc:
            kind = "shard_truncated" if read_any else "shard_unreadable"
            problem = f"{kind}: {without_addresses(exc)}"
    return sink.getvalue(), f"{problem}; {written} of {len(keep_positions)} kept samples written"


def flush(dst: tarfile.TarFile, members: list[tuple[tarfile.TarInfo, bytes]]) -> int:
    """Write one sample's kept members; 1 if it had any."""
    for member, payload in members:
        dst.addfile(member, io.BytesIO(payload))
    return 1 if members else 0


def readable_tables(files: list[str], cfg: FilterCfg) -> dict[str, str]:
    """{table: problem} of the embedding tables that cannot be read (one Ray task per table): they take no part
    in the run, and the summary names them."""
    def check(row):
        try:
            tables.read_table(row["file"], cfg.storage, ["status", "similarity"])
            return {"file": row["file"], "problem": ""}
        except (OSError, pa.ArrowException) as exc:
            return {"file": row["file"], "problem": f"table_unreadable: {exc}"}

    files_ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    return {r["file"]: r["problem"] for r in files_ds.map(check, num_cpus=cfg.num_cpus).take_all() if r["problem"]}


def run_concepts(cfg: FilterCfg, files: list[str], models: dict) -> tuple[dict, dict]:
    """The concept rules over every table (pipeline/curate/concepts.py): their queries embedded once, one task per
    table. Returns (the summary's `concepts`, the report's galleries per rule)."""
    queries = [q for c in cfg.concepts for q in c.queries]
    by = query_models(models)
    vectors = ray.get(ray.remote(num_cpus=cfg.num_cpus)(embed_queries).remote(queries, by))
    task = ray.remote(num_cpus=cfg.num_cpus)(apply_concepts)
    parts = ray.get([task.remote(f, vectors, cfg, cfg.gallery_per_band, not cfg.concepts_dry_run) for f in files])
    dropped = collections.Counter()
    for part in parts:
        dropped.update(part["dropped"])
    for c in cfg.concepts:
        log.info("concept %s (%s at cosine %g of %s): %d pairs dropped", c.name, c.action, c.threshold,
                 " / ".join(c.queries), dropped[c.name])
    summary = {"order": ORDER, "queries_embedded_by": by, "dry_run": cfg.concepts_dry_run,
               "rules": [{"name": c.name, "queries": list(c.queries), "action": c.action, "threshold": c.threshold,
                          "dropped": dropped[c.name]} for c in cfg.concepts]}
    return summary, merge_galleries(parts, cfg.concepts, cfg.gallery_per_band)


def run_filter_job(cfg: FilterCfg, plan: FilterPlan | None = None) -> dict:
    """Filter every table of cfg.embeddings into cfg.output; return the summary. `plan` is what plan_filter_run
    decided before Ray started (made here when not given)."""
    plan = plan or plan_filter_run(cfg)
    if not cfg.concepts_dry_run:  # a dry run records nothing in the output
        take_over_output(cfg, plan)
    unreadable = readable_tables(plan.files, cfg)
    for url, problem in unreadable.items():
        log.error("%s: %s; it takes no part in this run", url, problem)
    files = [f for f in plan.files if f not in unreadable]
    if cfg.concepts_dry_run:  # no dedup (it writes its drops): the galleries show every ok pair
        concepts, galleries = run_concepts(dataclasses.replace(cfg, dedup_threshold=None), files, plan.models)
        from pipeline.curate.report import write_concept_preview

        return {"concepts": concepts, "preview": write_concept_preview(cfg, plan.models, concepts, galleries),
                "problems": {tables.table_name(u): p for u, p in unreadable.items()}}
    dedup = None
    dedup_started = time.monotonic()
    if cfg.dedup_threshold is not None:  # first: the rule then applies to the survivors
        references = reference_tables(cfg.dedup_against, cfg.storage, exclude=[cfg.embeddings, cfg.output])
        dedup = find_duplicates(files, cfg.dedup_threshold, references, cfg.storage,
                                cfg.dedup_partition_size, cfg.dedup_probes, cfg.num_cpus, cfg.output)
        log.info("dedup at cosine >= %g: %d near-duplicates dropped (%d groups), %d matches of reference images",
                 cfg.dedup_threshold, dedup[NEAR_DUPLICATE], dedup["groups"], dedup[MATCHES_REFERENCE])
    dedup_s = round(time.monotonic() - dedup_started, 1)
    concepts_started = time.monotonic()
    concepts, galleries = run_concepts(cfg, files, plan.models) if cfg.concepts else (None, {})
    concepts_s = round(time.monotonic() - concepts_started, 1)
    if cfg.keep_top_fraction is not None:
        threshold, expected_kept, ok_pairs = exact_top_threshold(files, cfg)
        log.info("keep_top_fraction=%g of %d ok pairs: cut-off similarity %.6f", cfg.keep_top_fraction, ok_pairs,
                 threshold)
    else:
        threshold = cfg.min_similarity
    files_ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    results = [json.loads(r) for r in files_ds.map(
        lambda row: {"result": json.dumps(filter_table(row["file"], threshold, cfg))},
        num_cpus=cfg.num_cpus).to_pandas()["result"]]
    results.sort(key=lambda r: r["name"])
    problems = {**{tables.table_name(url): problem for url, problem in unreadable.items()},
                **{r["name"]: r["problem"] for r in results if r["problem"]}}
    for r in results:
        if r["problem"]:
            log.error("%s (%s): %s", r["name"], r["shard"], r["problem"])
    rows, ok, kept = (sum(r[k] for r in results) for k in ("rows", "ok", "kept"))
    reasons = collections.Counter()
    for r in results:
        reasons.update(r["errors_by_reason"])
    histogram = np.sum([r["histogram"] for r in results], axis=0).tolist()
    summary = {
        "rule": ({"keep_top_fraction": cfg.keep_top_fraction} if cfg.keep_top_fraction is not None
                 else {"min_similarity": cfg.min_similarity}),
        "threshold": threshold, "pairs": rows, "ok": ok, "errors": rows - ok, "kept": kept,
        "dropped": rows - kept, "kept_fraction_of_ok": round(kept / ok, 6) if ok else None,
        "errors_by_reason": dict(reasons),
        "duplicates": None if dedup is None else {
            "threshold": cfg.dedup_threshold, "against": cfg.dedup_against, **dedup},
        "concepts": concepts,
        "similarity_histogram": {"bins": REPORT_BINS, "range": [-1, 1], "counts": histogram},
        "shards": {r["shard"]: {k: r[k] for k in ("name", "rows", "ok", "duplicates", "concept_dropped", "kept",
                                                  "errors_by_reason")}
                   for r in results},
        # what could not be done in full, by table name: a rerun after the source is repaired completes it
        "problems": dict(sorted(problems.items())),
        "embeddings": cfg.embeddings, "write_shards": cfg.write_shards,
        "models": plan.models,
        "random_weights": plan.models.get("random_weights"),
    }
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    storage.write_atomically(fs, storage.join(out, "summary.json"),
                             json.dumps(summary, indent=2, ensure_ascii=False).encode())
    if cfg.report:
        from pipeline.curate.report import write_report

        write_report(cfg, summary, files, threshold, galleries)
    # not in summary.json, which a rerun must reproduce byte for byte
    return {**summary, "shards_skipped_already_written": sum(r["skipped"] for r in results), "dedup_s": dedup_s,
            "concepts_s": concepts_s}
