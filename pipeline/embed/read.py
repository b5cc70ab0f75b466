"""Read WebDataset tar shards as raw samples (member bytes grouped by key), streaming, with retries.

Nothing here decodes or extracts: members are read as bytes and only the image, caption and json members
are kept. Each shard ends with one marker row (position -1) that carries the number of samples read and
any shard-level failure, so the driver knows when every sample of a shard has been written.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.io import storage
from pipeline.config import JobCfg

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSION = "txt"
JSON_EXTENSION = "json"
LABEL_EXTENSION = "cls"  # class index of zero-shot evaluation sets (ImageNet WebDataset convention)
# the members a sample keeps; any other (.pkl, .pth, .npy ...) is never read, let alone unpickled
KEPT_EXTENSIONS = (*IMAGE_EXTENSIONS, CAPTION_EXTENSION, JSON_EXTENSION, LABEL_EXTENSION)
MARKER_POSITION = -1

RAW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("position", pa.int64()),
    ("image", pa.binary()),
    ("caption", pa.binary()),
    ("json", pa.binary()),
    ("error", pa.string()),        # sample-level failure found while reading (missing member, duplicate key...)
    ("warning", pa.string()),      # non-fatal notes (ignored members)
    ("shard_samples", pa.int64()),  # marker rows only: samples in the shard; -1 on sample rows
    ("shard_error", pa.string()),   # marker rows only: why the shard could not be (fully) read
])


class ShardFormatError(Exception):
    """The shard is readable but is not a (complete) tar: not retried."""


@dataclass
class RawSample:
    key: str
    position: int
    members: dict[str, bytes] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    error: str | None = None


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def positioned_members(tar: tarfile.TarFile) -> Iterator[tuple[int, str, str, tarfile.TarInfo]]:
    """(sample position, key, extension, member) for the regular members of a streamed tar: consecutive
    members with one key form a sample, and a repeated kept extension starts the next. The one grouping
    rule of the embed job (iter_tar_samples), the report and the filtered shards: they find samples by
    position."""
    position, current, seen = -1, None, set()
    for member in tar:
        if not member.isfile():
            continue  # directories, links, devices: never followed, never extracted
        key, ext = split_member_name(member.name)
        if key is None:
            continue
        if key != current or ext in seen:
            position, current, seen = position + 1, key, set()
        if ext in KEPT_EXTENSIONS:
            seen.add(ext)
        yield position, key, ext, member


def iter_tar_samples(fileobj) -> Iterator[RawSample]:
    """Group consecutive members with the same key into samples, in tar order.

    Raises ShardFormatError when the stream is not a tar or ends inside a member; samples completed before
    the cut have been yielded by then, and the partial one is yielded marked `shard_truncated`.
    """
    current: RawSample | None = None
    seen_keys: set[str] = set()
    completed = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|")
    except tarfile.ReadError as exc:
        raise ShardFormatError(f"not a tar file ({exc})") from None
    try:
        for position, key, ext, member in positioned_members(tar):
            if current is not None and position != current.position:
                yield current
                completed += 1
                current = None
            if current is None:
                current = RawSample(key=key, position=position)
                if key in seen_keys:
                    current.error = "duplicate_key: this key already appeared earlier in the shard"
                seen_keys.add(key)
            if ext in KEPT_EXTENSIONS:
                current.members[ext] = tar.extractfile(member).read()
            else:
                current.ignored.append(ext)
    except (tarfile.ReadError, EOFError) as exc:
        if current is not None:
            current.error = f"shard_truncated: the shard ends inside this sample ({exc})"
            yield current
        raise ShardFormatError(f"truncated tar after {completed + (current is not None)} samples ({exc})") from None
    if current is not None:
        yield current


def read_shard(url: str, cfg: JobCfg) -> Iterator[RawSample | tuple[int, str | None]]:
    """Yield the samples of one shard, then (number of samples, shard error or None).

    A transient storage error re-opens the shard and skips the samples already yielded, so no sample is
    read twice or lost. A missing shard or one that is not a tar is not retried.
    """
    fs, path = storage.filesystem(url, cfg.storage)
    done = 0
    for attempt in range(1, cfg.read.attempts + 1):
        try:
            with fs.open(path, "rb") as f:
                for sample in iter_tar_samples(f):
                    if sample.position < done:
                        continue
                    yield sample
                    done += 1
            yield done, None
            return
        except FileNotFoundError:
            yield done, f"shard_missing: {url} does not exist"
            return
        except ShardFormatError as exc:
            yield done, f"shard_unreadable: {exc}" if done == 0 else f"shard_truncated: {exc}"
            return
        except PermissionError as exc:
            yield done, f"shard_access_denied: {url}: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - storage clients raise many types for a dropped connection
            if attempt == cfg.read.attempts:
                yield done, f"shard_read_failed after {attempt} attempts: {type(exc).__name__}: {exc}"
                return
            delay = cfg.read.retry_backoff_s * 2 ** (attempt - 1)
            log.warning("reading %s failed (%s: %s); attempt %d/%d in %.1fs",
                        url, type(exc).__name__, exc, attempt + 1, cfg.read.attempts, delay)
            time.sleep(delay)


def read_shards(batch: pa.Table, cfg: JobCfg) -> Iterator[pa.Table]:
    """Ray Data stage: a block of shard URLs in, blocks of raw samples out (then one marker row per shard)."""
    for url in batch.column("shard").to_pylist():
        rows: list[dict] = []
        for item in read_shard(url, cfg):
            if isinstance(item, RawSample):
                rows.append(_sample_row(url, item))
                if len(rows) == cfg.read.batch_size:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
            else:
                count, shard_error = item
                rows.append(_marker_row(url, count, shard_error))
        yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _sample_row(url: str, sample: RawSample) -> dict:
    image_exts = [e for e in IMAGE_EXTENSIONS if e in sample.members]
    warnings = []
    if len(image_exts) > 1:
        warnings.append(f"several images ({', '.join(image_exts)}); used .{image_exts[0]}")
    if sample.ignored:
        warnings.append(f"ignored members: {', '.join(sorted(set(sample.ignored)))}")
    return {
        "key": sample.key, "shard": url, "position": sample.position,
        "image": sample.members[image_exts[0]] if image_exts else None,
        "caption": sample.members.get(CAPTION_EXTENSION),
        "json": sample.members.get(JSON_EXTENSION),
        "error": sample.error, "warning": "; ".join(warnings) or None,
        "shard_samples": -1, "shard_error": None,
    }


def _marker_row(url: str, count: int, shard_error: str | None) -> dict:
    return {"key": "", "shard": url, "position": MARKER_POSITION, "image": None, "caption": None, "json": None,
            "error": None, "warning": None, "shard_samples": count, "shard_error": shard_error}
