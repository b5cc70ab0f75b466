"""A real S3-protocol server on localhost (moto's server, as s3fs's own tests use), started per module."""

from __future__ import annotations

import os
import socket
import struct
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


FAULTS = ("slowdown", "reset_get", "reset_put", "stall", "deny_all", "deny_write")


class FlakyProxy:
    """An HTTP proxy in front of the S3 server that breaks requests for the job's data (shards, parts, tables:
    .tar and .parquet objects) and forwards the others unchanged: of each `every` such requests a fault applies
    to, the last `burst` are broken. `injected` counts the faults made, `broken` lists their requests.
    Faults, as S3 and networks make them:
      slowdown   the request is answered 503 SlowDown (S3 under load)
      reset_get  a GET gets its headers and half its body, then the connection is reset
      reset_put  a PUT's connection is reset after half its body was received
      stall      the request waits `stall_s` before it is answered (a stuck connection)
      deny_all   any request, data or not, is answered 403 AccessDenied (credentials without access)
      deny_write any PUT or DELETE is answered 403 AccessDenied (a read-only role)
    A burst of 2 outlasts aiohttp's own one re-send of an idempotent request on a reused connection."""

    def __init__(self, upstream: str, every: int, fault: str = "slowdown", stall_s: float = 5.0, burst: int = 1):
        import http.server
        import threading
        from urllib.parse import urlparse

        assert fault in FAULTS, fault
        proxy = self
        self.every, self.burst, self.fault, self.requests, self.injected = every, burst, fault, 0, 0
        self._lock = threading.Lock()
        self._eligible, self.broken = 0, []  # broken: (method, path) of each request a fault was put into
        up = urlparse(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reset(self):
                """Abort the connection with a TCP reset, as a broken network does."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _any(self):
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                data_object = self.path.split("?")[0].endswith((".tar", ".parquet"))
                applies = {"deny_all": True, "deny_write": self.command in ("PUT", "DELETE")}.get(proxy.fault) or (
                    data_object and {"slowdown": True, "stall": True, "reset_get": self.command == "GET",
                                     "reset_put": self.command == "PUT"}.get(proxy.fault, False))
                with proxy._lock:
                    proxy.requests += 1
                    proxy._eligible += applies
                    fail = applies and proxy._eligible % proxy.every >= proxy.every - proxy.burst
                if fail and proxy.fault == "reset_put":
                    self.rfile.read(length // 2)
                    proxy._count(self)
                    return self._reset()
                body = self.rfile.read(length)
                if fail and proxy.fault in ("slowdown", "deny_all", "deny_write"):
                    proxy._count(self)
                    status, code, message = ((503, b"SlowDown", b"Please reduce your request rate.")
                                             if proxy.fault == "slowdown" else (403, b"AccessDenied", b"Access Denied"))
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>"
                               + message + b"</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fail and proxy.fault == "stall":
                    proxy._count(self)
                    time.sleep(proxy_stall_s)  # the client gives up first (storage.timeout_s) and retries
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    # a HEAD's Content-Length is the object's size: only that one passes through
                    if key.lower() not in ("transfer-encoding", "connection") and (
                            key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fail and proxy.fault == "reset_get":
                    self.wfile.write(data[:len(data) // 2])
                    proxy._count(self)
                    return self._reset()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        proxy_stall_s = stall_s

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that gave up on a stalled answer
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _count(self, request):
        with self._lock:
            self.injected += 1
            self.broken.append((request.command, request.path))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
