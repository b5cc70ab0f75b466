"""A real S3-protocol server on localhost (moto's server, as s3fs's own tests use), started per module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import requests

SECRET = "PLANTED-secret-" + uuid.uuid4().hex  # any credential value must never show up in logs or files
ACCESS_KEY = "AKIA" + uuid.uuid4().hex[:16].upper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server():
    """Yield the endpoint URL of a fresh moto S3 server; the AWS variables point every client at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


def new_bucket(endpoint: str) -> str:
    import boto3

    name = "b-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def upload_folder(endpoint: str, bucket: str, folder, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def all_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
