"""A local S3 server for tests: moto on 127.0.0.1, a free port, fake credentials.

Use it from a test module with `pytest_plugins = ["tests.s3server"]` and the `s3_server`
fixture. While the test runs, the fake credentials and the endpoint are in this process's
environment (so s3fs, boto3 and zarr reach the server in-process); `server.env` holds the same
variables for a subprocess (`env={**os.environ, **server.env}`). No request can reach AWS.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# moto accepts any credentials.
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would take precedence over the fake credentials or the endpoint: removed.
UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


@dataclass(frozen=True)
class S3Server:
    """A running moto server: `endpoint` is its URL, `env` what a client process needs
    (FAKE_ENV plus AWS_ENDPOINT_URL, which boto3, s3fs and DVC use when no endpoint is set)."""

    endpoint: str
    env: dict[str, str]

    def client(self):
        """A boto3 S3 client on this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def make_bucket(self, name: str) -> str:
        """Create the bucket `name` (3 to 63 characters: a-z, 0-9, '-', '.'); returns
        "s3://NAME"."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted."""
        listing = self.client().get_paginator("list_objects_v2")
        pages = listing.paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def reset(self) -> None:
        """Forget every bucket. moto keeps its state in this process's globals, shared by
        every server (and every `mock_aws`) in it, so each test starts and ends with a reset."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def s3_server(monkeypatch, tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server for this test only, with no buckets."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    from moto.server import ThreadedMotoServer

    # Port 0: the OS picks a free port as the server binds it (no race with other processes;
    # a port taken between choosing and binding would leave start() waiting forever).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # Empty AWS config and credentials files (not os.devnull: DVC refuses a config file that
        # is not a regular file), so a developer's ~/.aws (a profile, a region, an endpoint)
        # never changes what a test does.
        empty = tmp_path_factory.mktemp("aws") / "empty"
        empty.write_text("")
        files = {"AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
        env = {**FAKE_ENV, **files, "AWS_ENDPOINT_URL": endpoint}
        for name in UNSET:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        s3 = S3Server(endpoint=endpoint, env=env)
        s3.reset()
        _forget_clients()
        yield s3
        s3.reset()
    finally:
        _forget_clients()
        server.stop()


def _forget_clients() -> None:
    """Drop fsspec's cached S3 file systems: one made for an earlier test's server would keep
    its endpoint (the environment is read when a client is made, and is not in the cache key)."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
