"""A real S3 endpoint on 127.0.0.1 for the tests (moto in server mode: real HTTP, real multipart uploads)."""
from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from cgn_dist.distributed.env import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start the server; yields its endpoint URL. Loopback only."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a user sets for an S3-compatible endpoint (inherited by workers and subprocesses)."""
    return dict(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)


def make_bucket(endpoint: str) -> str:
    import boto3

    name = f"cgn-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                   if k != "AWS_DEFAULT_REGION"},
                 region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
    return name


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes, read with boto3 (independent of fsspec)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            try:
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            except s3.exceptions.NoSuchKey:  # removed since the listing (a writer's probe object)
                continue
            out[obj["Key"][len(prefix):].lstrip("/")] = body
    return out


def clear_fsspec_cache() -> None:
    # fsspec caches filesystem instances per (class, kwargs): new credentials need a new instance
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
