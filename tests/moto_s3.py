"""moto's standalone S3 server on a free loopback port, for the S3 store tests (a pytest plugin:
test modules name it in ``pytest_plugins``, so every module shares one server per session)."""
from __future__ import annotations

import socket
import uuid

import pytest

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """One moto server; ``new_bucket()`` gives each test a bucket of its own."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment that points boto3 (and `petserve serve`) at ``endpoint`` with dummy keys."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto_s3, monkeypatch) -> MotoS3:
    """The session's moto server, with this test's environment pointing boto3 at it."""
    for name, value in aws_env(moto_s3.endpoint).items():
        monkeypatch.setenv(name, value)
    return moto_s3


@pytest.fixture
def private_moto_s3(monkeypatch):
    """A moto server of the test's own, which the test may stop (an S3 outage); the environment
    points boto3 at it."""
    server = MotoS3()
    for name, value in aws_env(server.endpoint).items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()
