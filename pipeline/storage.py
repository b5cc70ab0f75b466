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
        if storage.endpoint_url:
            options["endpoint_url"] = storage.endpoint_url
        if storage.region:
            options["client_kwargs"] = {"region_name": storage.region}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for a protocol-less path of `fs` (what users see in the `shard` column)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


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
