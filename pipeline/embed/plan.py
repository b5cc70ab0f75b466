"""What an embed run will do, decided on the driver before Ray starts: the shards, the model, what the output
already holds and whether it was made the same way. Every problem found here is the user's to fix (exit 2)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.config import JobCfg
from pipeline.embed.model import decide_random_weights
from pipeline.embed.preprocess import BUNDLED_VOCAB_DIR, MAX_TEXT_TOKENS, resolve_tokenizer
from pipeline.io import settings, storage, tables
from pipeline.io.shards import Shard, committed_names, list_shards

log = logging.getLogger(__name__)

# the bundled vocab lives in each checkout (a Ray job's working dir differs per job): recorded by name
BUNDLED_TOKENIZER = "bundled Chinese BERT vocab (pipeline/embed/data/vocab.txt)"


@dataclass(frozen=True)
class EmbedPlan:
    shards: list[Shard]            # every shard of the input, in order
    committed: frozenset[str]      # names of shards whose table is committed and kept (empty with overwrite)
    random_weights: bool
    tokenizer: tuple[str, str | None]
    settings: dict                 # what produced (and will produce) the output's tables
    replaced: tuple[str, ...]      # with overwrite=true over other settings: what differed

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.name not in self.committed]


def model_name(name: str) -> str:
    """A local folder as an absolute path (the same folder however it was spelled), a Hub id as it is."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def embed_settings(cfg: JobCfg, random_weights: bool, tokenizer: tuple[str, str | None]) -> dict:
    """Everything that changes a table's numbers or its errors: one output holds one vector space."""
    source, revision = tokenizer
    return {
        "text_model": model_name(cfg.model.text), "text_revision": cfg.model.text_revision,
        "image_model": model_name(cfg.model.image), "image_revision": cfg.model.image_revision,
        "random_weights": random_weights,
        "tokenizer": BUNDLED_TOKENIZER if source == str(BUNDLED_VOCAB_DIR) else model_name(source),
        "tokenizer_revision": revision, "max_text_tokens": MAX_TEXT_TOKENS,
        "precision": cfg.model.precision, "embedding_dtype": cfg.write.embedding_dtype,
        "image_size": cfg.read.image_size, "decode_on": cfg.read.decode_on,
        "max_image_pixels": cfg.read.max_image_pixels,
    }


def settings_of_tables(cfg: JobCfg, committed: set[str]) -> dict | None:
    """An output written before settings were recorded: what its first table's metadata says."""
    if not committed:
        return None
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    first = storage.unstrip(fs, storage.join(out, "embeddings", f"{min(committed)}.parquet"))
    meta = tables.embedding_models(first, cfg.storage)
    # the models and the weights: the tokenizer was recorded as a path of the checkout that ran then
    return {"text_model": meta["text_model"] and model_name(meta["text_model"]), "text_revision": meta["text_revision"],
            "image_model": meta["image_model"] and model_name(meta["image_model"]),
            "image_revision": meta["image_revision"], "random_weights": meta["random_weights"]}


def plan_embed_run(cfg: JobCfg) -> EmbedPlan:
    """Raises ValueError (a missing input, unreachable weights, an output made with other settings) or
    storage.StorageError (no access), before any work."""
    shards = list_shards(cfg)
    storage.check_writable(cfg.output, cfg.storage)
    random_weights = decide_random_weights(cfg)
    tokenizer = resolve_tokenizer(cfg, random_weights)
    current = embed_settings(cfg, random_weights, tokenizer)
    committed = committed_names(cfg)
    if settings.recorded(cfg.output, cfg.storage) is None and committed:
        legacy = settings_of_tables(cfg, committed)
        found = settings.differences(legacy, {k: current[k] for k in legacy})
        if found and not cfg.overwrite:
            raise settings.SettingsMismatch(
                f"output {cfg.output} holds tables made with other settings ({'; '.join(found)}): rerun with "
                "--set overwrite=true to recompute all of it, or choose another output")
    else:
        found = settings.check(cfg.output, cfg.storage, current, cfg.overwrite)
    return EmbedPlan(shards=shards, committed=frozenset() if cfg.overwrite else frozenset(committed),
                     random_weights=random_weights, tokenizer=tokenizer, settings=current, replaced=tuple(found))


def take_over_output(cfg: JobCfg, plan: EmbedPlan) -> None:
    """Record the plan's settings in the output, before any commit. With overwrite=true over other settings,
    every table the output holds is removed first: each belongs to the other vector space, and a run that
    stops halfway must not leave them beside the new ones (a rerun would keep them as committed)."""
    if plan.replaced:
        fs, out = storage.filesystem(cfg.output, cfg.storage)
        stale = fs.glob(storage.join(out, "embeddings", "*.parquet"))
        log.warning("overwrite=true over an output made with other settings (%s): its %d tables are removed "
                    "and every shard is recomputed", "; ".join(plan.replaced), len(stale))
        for path in stale:
            fs.rm(path)
    settings.record(cfg.output, cfg.storage, plan.settings)
