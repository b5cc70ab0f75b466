"""Curation by meaning: drop pairs whose image is near a text query ("水印", "二维码"), or keep only those near one.

A concept rule has a name, one or more text queries, an action and a cosine threshold. The queries are embedded
once per run by the text tower that embedded the tables (model, revision, tokenizer and random-weights flag from
their metadata; the embed job's own protocol), and each ok pair's image embedding is compared with them:
- drop: the pair is dropped when its image's cosine with any of the rule's queries is >= threshold;
- keep_only: the pair is dropped when none of the rule's queries reaches the threshold.
Rules apply after dedup and before the similarity rule, to the ok pairs dedup left, in config order; a pair is
dropped by the first rule that takes it, and listed once in {output}/concepts/{table}.parquet (reason
`concept:<name>`, the query nearest its image and that cosine). One Ray task per table; the driver holds the
query vectors only.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import StorageCfg
from pipeline.curate.dedup import dropped_positions, normalized
from pipeline.io import storage, tables
from pipeline.io.schema import STATUS_OK

ACTIONS = ("drop", "keep_only")
CONCEPT_DROPS_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("position", pa.int64()), ("reason", pa.string()),
    ("query", pa.string()), ("cosine", pa.float32()),
])
ORDER = "dedup, then the concept rules in config order, then the similarity rule"


@dataclass(frozen=True)
class ConceptCfg:
    # the rule's name: its drops read `concept:<name>` and the summary counts them under it
    name: str = ""
    # one or more text queries, in the language of the text tower (Chinese for Taiyi), e.g. [水印, 水印文字]
    queries: list[str] = field(default_factory=list)
    # drop: drop pairs whose image is within the threshold of any query; keep_only: drop all the others
    action: str = "drop"
    # cosine between an image embedding and a query's text embedding at which the query matches, in [-1, 1]
    threshold: float | None = None


def validate_concepts(concepts: list[ConceptCfg]) -> None:
    names = [c.name for c in concepts]
    for i, c in enumerate(concepts):
        where = f"concepts[{i}]"
        if not c.name or not all(ch.isalnum() or ch in "_-" for ch in c.name):
            raise ValueError(f"{where}.name: letters, digits, _ or - (it names the rule in reasons), got {c.name!r}")
        if names.count(c.name) > 1:
            raise ValueError(f"{where}.name: {c.name!r} is used by more than one rule")
        if not c.queries or not all(q.strip() for q in c.queries):
            raise ValueError(f"{where}.queries: one or more non-empty text queries")
        if c.action not in ACTIONS:
            raise ValueError(f"{where}.action: one of {', '.join(ACTIONS)}, got {c.action!r}")
        if c.threshold is None or not -1.0 <= c.threshold <= 1.0:
            raise ValueError(f"{where}.threshold: a cosine in [-1, 1], got {c.threshold!r}")


def query_models(models: dict) -> dict:
    """What embeds the queries: the text tower, revision, tokenizer and weights that made the tables."""
    return {k: models.get(k) for k in ("text_model", "text_revision", "image_model", "image_revision", "tokenizer",
                                       "random_weights")}


def embed_queries(queries: list[str], models: dict) -> np.ndarray:
    """L2-normalised float32 text embeddings of `queries`, by the embed job's own Encoder and tokenizer (fp32 on
    this task's CPU: a GPU's fp16 towers would differ by ~1e-3 of cosine)."""
    from pipeline.config import load_config
    from pipeline.embed.encode import Encoder
    from pipeline.embed.preprocess import load_tokenizer, resolve_tokenizer, tokenize

    if not models.get("text_model") or not models.get("image_model"):
        raise ValueError("concepts: the embedding tables do not name the models that made them (no metadata); "
                         "the queries cannot be embedded by the same text tower")
    cfg = load_config(None, [
        "input=unused", "output=unused", f"model.text={models['text_model']}", f"model.image={models['image_model']}",
        "model.precision=fp32", "encoder.actors=1", "encoder.num_gpus=0",
        f"model.random_weights={'true' if models.get('random_weights') else 'false'}"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text_revision=models.get("text_revision"), image_revision=models.get("image_revision")))
    random_weights = bool(models.get("random_weights"))
    source, revision = models.get("tokenizer"), None
    if not source or (source.startswith("/") and not Path(source).exists()):  # another machine's bundled vocab
        source, revision = resolve_tokenizer(cfg, random_weights)
    elif source == models["text_model"]:
        revision = models.get("text_revision")
    encoder = Encoder(cfg, random_weights)
    ids = tokenize(load_tokenizer(source, revision), list(queries))
    return np.asarray(encoder.embed_texts(ids).cpu().numpy(), np.float32)


def rule_columns(concepts: list[ConceptCfg]) -> list[list[int]]:
    """For each rule, the rows of the query matrix that hold its queries (all rules' queries in order)."""
    columns, start = [], 0
    for c in concepts:
        columns.append(list(range(start, start + len(c.queries))))
        start += len(c.queries)
    return columns


def nearest(cosines: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `cosines`, the index of the nearest query among `columns` and its cosine."""
    best = columns[0] + np.argmax(cosines[:, columns], axis=1) if len(cosines) else np.zeros(0, np.int64)
    return best, cosines[np.arange(len(cosines)), best]


def decide(cosines: np.ndarray, concepts: list[ConceptCfg]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rule index or -1, nearest query index, its cosine) for each row of `cosines` (pairs x all queries):
    the first rule that drops the pair, in config order."""
    n = len(cosines)
    rule = np.full(n, -1, np.int64)
    query = np.zeros(n, np.int64)
    cosine = np.zeros(n, np.float32)
    for index, (c, cols) in enumerate(zip(concepts, rule_columns(concepts))):
        best, best_cosine = nearest(cosines, cols)
        near = best_cosine >= np.float32(c.threshold)
        hit = (rule < 0) & (near if c.action == "drop" else ~near)
        rule[hit], query[hit], cosine[hit] = index, best[hit], best_cosine[hit]
    return rule, query, cosine


def concept_path(output: str, name: str, storage_cfg: StorageCfg) -> tuple:
    fs, out = storage.filesystem(output, storage_cfg)
    return fs, storage.join(out, "concepts", f"{name}.parquet")


def candidates(url: str, cfg) -> tuple[pa.Table, np.ndarray]:
    """One table's ok pairs that dedup left (key, shard, position, caption), and their unit image vectors."""
    table = tables.read_table(url, cfg.storage, ["key", "shard", "position", "status", "caption", "image_embedding"])
    mask = pc.equal(table.column("status"), STATUS_OK)
    if cfg.dedup_threshold is not None:
        dropped = pa.array(sorted(dropped_positions(cfg.output, tables.table_name(url), cfg.storage)), pa.int64())
        mask = pc.and_(mask, pc.invert(pc.is_in(table.column("position"), value_set=dropped)))
    kept = table.filter(mask)
    return kept.drop_columns(["status", "image_embedding"]), normalized(tables.image_vectors(kept))


def apply_concepts(url: str, query_vectors: np.ndarray, cfg, per_band: int, write: bool) -> dict:
    """One table: its concept drops (written to concepts/{table}.parquet unless `write` is off: a dry run) and,
    per rule, gallery candidates for the report: the pairs nearest its queries, and those just above and just
    below its threshold. Returns {"dropped": {rule: n}, "gallery": {rule: {band: [rows]}}}."""
    concepts = cfg.concepts
    pairs, vectors = candidates(url, cfg)
    cosines = vectors @ query_vectors.T
    rule, query, cosine = decide(cosines, concepts)
    queries = [q for c in concepts for q in c.queries]
    if write:
        hit = np.flatnonzero(rule >= 0)
        drops = pa.table({
            "key": pairs.column("key").take(hit), "shard": pairs.column("shard").take(hit),
            "position": pairs.column("position").take(hit),
            "reason": pa.array([f"concept:{concepts[r].name}" for r in rule[hit]], pa.string()),
            "query": pa.array([queries[q] for q in query[hit]], pa.string()),
            "cosine": pa.array(cosine[hit], pa.float32())}, schema=CONCEPT_DROPS_SCHEMA)
        fs, path = concept_path(cfg.output, tables.table_name(url), cfg.storage)
        sink = io.BytesIO()
        pq.write_table(drops, sink)
        storage.write_atomically(fs, path, sink.getvalue())
    rows = pairs.to_pylist()
    gallery = {}
    for c, cols in zip(concepts, rule_columns(concepts)):
        best, best_cosine = nearest(cosines, cols)

        def shown(order):
            return [{**rows[i], "query": queries[best[i]], "cosine": float(best_cosine[i])} for i in order]

        above = np.flatnonzero(best_cosine >= np.float32(c.threshold))
        below = np.flatnonzero(best_cosine < np.float32(c.threshold))
        gallery[c.name] = {
            "nearest": shown(np.argsort(-best_cosine, kind="stable")[:per_band]),
            "above": shown(above[np.argsort(best_cosine[above], kind="stable")][:per_band]),
            "below": shown(below[np.argsort(-best_cosine[below], kind="stable")][:per_band]),
        }
    return {"dropped": {c.name: int((rule == i).sum()) for i, c in enumerate(concepts)}, "gallery": gallery}


def merge_galleries(parts: list[dict], concepts: list[ConceptCfg], per_band: int) -> dict:
    """The global galleries from the tables' candidates: nearest first; just above the threshold ascending,
    just below descending (the threshold falls between the two bands)."""
    merged = {}
    for c in concepts:
        rows = {band: [r for p in parts for r in p["gallery"][c.name][band]] for band in ("nearest", "above", "below")}
        merged[c.name] = {"nearest": sorted(rows["nearest"], key=lambda r: -r["cosine"])[:per_band],
                          "above": sorted(rows["above"], key=lambda r: r["cosine"])[:per_band],
                          "below": sorted(rows["below"], key=lambda r: -r["cosine"])[:per_band]}
    return merged


def concept_dropped_positions(output: str, name: str, storage_cfg: StorageCfg) -> set[int]:
    """Positions of one table's pairs that a concept rule dropped (read back from concepts/{name}.parquet)."""
    fs, path = concept_path(output, name, storage_cfg)
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["position"]).column("position").to_pylist())


def removed_before_rule(cfg, name: str) -> set[int]:
    """Positions of one table that dedup and the concept rules took out before the similarity rule."""
    removed = set()
    if cfg.dedup_threshold is not None:
        removed |= dropped_positions(cfg.output, name, cfg.storage)
    if cfg.concepts and not cfg.concepts_dry_run:
        removed |= concept_dropped_positions(cfg.output, name, cfg.storage)
    return removed
