"""fsspec filesystems for any URL (local, s3://, gs://...), configured from StorageCfg and the AWS env chain."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageCfg


def filesystem(url: str, storage: StorageCfg) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and protocol-less path for `url`. Credentials are never passed here: botocore reads
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE itself."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = {}
    if protocol in ("s3", "s3a"):
        options["anon"] = storage.anonymous
        # SlowDown / 503 / dropped connections / timeouts: botocore retries with exponential backoff and jitter
        # (botocore's own `max_attempts` counts retries after the first attempt; `total_max_attempts` counts all)
        options["config_kwargs"] = {"retries": {"total_max_attempts": storage.max_attempts, "mode": "standard"},
                                    "connect_timeout": storage.timeout_s, "read_timeout": storage.timeout_s}
        if storage.endpoint_url:
            options["endpoint_url"] = storage.endpoint_url
        if storage.region:
            options["client_kwargs"] = {"region_name": storage.region}
    fs, path = fsspec.core.url_to_fs(url, **options)
    if protocol in ("s3", "s3a"):
        # s3fs re-requests a response broken off mid-body (5 times by default): one setting for both layers, so
        # that storage.max_attempts=1 means one attempt
        fs.retries = storage.max_attempts
    fs.invalidate_cache()  # fsspec reuses instances: a listing cached by an earlier run would be stale
    return fs, path


class StorageError(RuntimeError):
    """A persistent storage failure (no such bucket, access denied) found before any work starts."""


def check_readable(url: str, storage: StorageCfg) -> None:
    fs, path = filesystem(url, storage)
    try:
        fs.ls(path, detail=False)
    except FileNotFoundError:
        raise StorageError(f"input: {url} does not exist (no such bucket or folder)") from None
    except PermissionError as exc:
        raise StorageError(f"input: access denied listing {url}: {exc}") from None
    except OSError as exc:
        raise StorageError(f"input: cannot list {url}: {type(exc).__name__}: {exc}") from None


def check_writable(url: str, storage: StorageCfg) -> None:
    """Write and delete a marker, so a wrong bucket or missing permission fails now, not after hours."""
    fs, path = filesystem(url, storage)
    probe = join(path, "_runs", ".write-check")
    try:
        if is_local(fs):
            fs.makedirs(fs._parent(probe), exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)
    except FileNotFoundError:
        raise StorageError(f"output: {url} cannot be written (no such bucket?)") from None
    except PermissionError as exc:
        raise StorageError(f"output: access denied writing {url}: {exc}") from None
    except OSError as exc:
        raise StorageError(f"output: cannot write {url}: {type(exc).__name__}: {exc}") from None


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for a protocol-less path of `fs` (what users see in the `shard` column)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    """Readers never see a partial file: object stores publish a PUT whole; on a disk we rename."""
    if is_local(fs):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{fs._parent(path)}/.{path.rsplit('/', 1)[-1]}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(payload)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, payload)
