"""List the input shards (path, glob or brace range) and find the ones already committed in the output."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from braceexpand import braceexpand

from pipeline.io import storage
from pipeline.config import JobCfg

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    url: str   # full URL, as recorded in the `shard` column
    name: str  # file name without .tar: the output file is embeddings/{name}.parquet


def shard_name(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".tar")] if base.endswith(".tar") else base


def list_shards(cfg: JobCfg) -> list[Shard]:
    """Every shard named by `cfg.input`, in order: `.tar` names (kept even if missing: the reader reports
    them as failed shards), globs (one that matches nothing is an error) and folders of `.tar` files."""
    fs, _ = storage.filesystem(cfg.input, cfg.storage)
    first = next(iter(braceexpand(cfg.input)))
    fixed = first[: min([first.index(c) for c in GLOB_CHARS if c in first] or [len(first)])]
    storage.check_readable(storage.parent(fixed), cfg.storage)  # no such bucket / access denied: fail now
    urls: list[str] = []
    for pattern in braceexpand(cfg.input):
        path = fs._strip_protocol(pattern)
        if any(c in pattern for c in GLOB_CHARS):
            matches = sorted(fs.glob(path))
            if not matches:
                raise ValueError(f"input: {pattern!r} matched no shards")
            urls.extend(storage.unstrip(fs, m) for m in matches)
        elif pattern.endswith(".tar"):
            urls.append(storage.unstrip(fs, path))  # not checked here: the reader reports a missing shard
        else:
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar")) if fs.isdir(path) else []
            if not found:
                raise ValueError(f"input: {pattern!r} is neither a .tar shard nor a folder holding some")
            urls.extend(storage.unstrip(fs, p) for p in found)
    if not urls:
        raise ValueError(f"input: {cfg.input!r} names no shards")
    # a missing .tar is a failed shard of the run, but an input none of whose shards exists is a mistake
    # (a typo'd folder): stops at the first that exists, so a long list costs one request
    if not any(fs.exists(fs._strip_protocol(url)) for url in dict.fromkeys(urls)):
        raise ValueError(f"input: none of the shards of {cfg.input!r} exists")
    shards, seen = [], {}
    for url in dict.fromkeys(urls):  # keep order, drop repeats of the same URL
        shard = Shard(url=url, name=shard_name(url))
        if shard.name in seen:
            raise ValueError(f"input: shards {seen[shard.name]!r} and {url!r} would both write "
                             f"embeddings/{shard.name}.parquet; shard file names must be unique")
        seen[shard.name] = url
        shards.append(shard)
    return shards


def committed_names(cfg: JobCfg) -> set[str]:
    """Names of shards whose embedding file is already in `{output}/embeddings/`."""
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    folder = storage.join(out, "embeddings")
    if not fs.exists(folder):
        return set()
    return {p.rsplit("/", 1)[-1][: -len(".parquet")]
            for p in fs.ls(folder, detail=False) if p.endswith(".parquet")}
