"""What a filter run will do, decided on the driver before Ray starts: the embedding tables, the output's access,
and whether the output was made by the same rule from the same tables. Every problem here is the user's (exit 2)."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from pipeline.curate.dedup import reference_tables
from pipeline.io import settings, storage, tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterPlan:
    files: list[str]           # the embed job's committed tables, sorted
    models: dict               # what made their embeddings (random_weights among it), from the first table
    settings: dict             # what produced (and will produce) the output
    replaced: tuple[str, ...]  # with overwrite=true over other settings: what differed


def filter_settings(cfg, files: list[str]) -> dict:
    """The rule, dedup and the exact tables it reads: the keep-lists, shards, summary and report of an output
    are one result of these. New or changed tables change the result (the top fraction's cut-off, duplicate
    groups), so they count as other settings."""
    references = (reference_tables(cfg.dedup_against, cfg.storage, exclude=[cfg.embeddings, cfg.output])
                  if cfg.dedup_against else [])
    return {
        "rule": ({"keep_top_fraction": cfg.keep_top_fraction} if cfg.keep_top_fraction is not None
                 else {"min_similarity": cfg.min_similarity}),
        "dedup": None if cfg.dedup_threshold is None else {
            "threshold": cfg.dedup_threshold, "against": [where(a) for a in cfg.dedup_against],
            "partition_size": cfg.dedup_partition_size, "probes": cfg.dedup_probes,
            "reference_tables": tables.fingerprint([r.url for r in references], cfg.storage)},
        "write_shards": cfg.write_shards,
        "embeddings": where(cfg.embeddings),
        "embedding_tables": tables.fingerprint(files, cfg.storage),
        # only when there are rules: an output recorded before concept rules existed has none either
        **({"concepts": [dataclasses.asdict(c) for c in cfg.concepts]} if cfg.concepts else {}),
    }


def where(url: str) -> str:
    """A local folder as an absolute path (`out/` from one directory and `/data/out` are the same output)."""
    return url if "://" in url else os.path.abspath(url)


def plan_filter_run(cfg) -> FilterPlan:
    """Raises ValueError (no tables, an output made with other settings) or storage.StorageError."""
    files = tables.embedding_files(cfg.embeddings, cfg.storage)
    storage.check_writable(cfg.output, cfg.storage)
    current = filter_settings(cfg, files)
    # a dry run writes only its preview: whatever the output holds stays as it is
    found = [] if cfg.concepts_dry_run else settings.check(cfg.output, cfg.storage, current, cfg.overwrite)
    return FilterPlan(files=files, models=models_of(files, cfg), settings=current, replaced=tuple(found))


def models_of(files: list[str], cfg) -> dict:
    """What made the embeddings, from the first table whose metadata can be read (a damaged table is named by
    the run, not here)."""
    for url in files:
        try:
            return tables.embedding_models(url, cfg.storage)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            log.warning("%s: metadata unreadable (%s)", url, exc)
    return {}


def take_over_output(cfg, plan: FilterPlan) -> None:
    """Record the plan's settings, before any keep-list is written. With overwrite=true over other settings,
    the keep-lists and shards of the other result go first: none may survive beside the new rule's."""
    if plan.replaced:
        fs, out = storage.filesystem(cfg.output, cfg.storage)
        stale = [*fs.glob(storage.join(out, "keep", "*.parquet")), *fs.glob(storage.join(out, "shards", "*.tar"))]
        log.warning("overwrite=true over an output made with other settings (%s): its %d keep-lists and shards "
                    "are removed and every table is filtered again", "; ".join(plan.replaced), len(stale))
        for path in stale:
            fs.rm(path)
    settings.record(cfg.output, cfg.storage, plan.settings)


def dry_run_report(cfg, plan: FilterPlan, shown: int = 5) -> dict:
    """What a run would do, from the plan alone (no Ray, nothing written)."""
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    written = {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in fs.glob(storage.join(out, "keep", "*.parquet"))}
    names = [tables.table_name(f) for f in plan.files]
    return {"tables": len(plan.files), "first_tables": plan.files[:shown],
            "already_written": 0 if cfg.overwrite or plan.replaced else len(written & set(names)),
            "random_weights": plan.models.get("random_weights"), "output_settings": plan.settings,
            "replaces_other_settings": list(plan.replaced), "num_cpus_per_task": cfg.num_cpus}

