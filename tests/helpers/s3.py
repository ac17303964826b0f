"""A real S3 endpoint on loopback (moto's server) for the model and adapter stores."""

from __future__ import annotations

import contextlib

from .servers import free_port

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3(*buckets: str):
    """A real S3 endpoint on loopback (moto's server): yields (endpoint URL, a boto3 client) with
    ``buckets`` created; servers reach it with S3_CREDENTIALS and AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    try:
        yield endpoint, client
    finally:
        server.stop()
