"""A real S3-compatible server on 127.0.0.1 for the tests: moto's standalone server (an HTTP server in a thread
of the test process, speaking the S3 REST API), reached by every `calm-train` subprocess through the endpoint
variables boto3 and streaming read.  No client is mocked: requests go over TCP to the server."""
from __future__ import annotations

import logging
import os
import urllib.request

ENV = {"AWS_ACCESS_KEY_ID": "calm-test", "AWS_SECRET_ACCESS_KEY": "calm-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self):
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {**ENV, "S3_ENDPOINT_URL": self.endpoint}

    def client(self, **credentials):
        import boto3
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                              aws_access_key_id=credentials.get("key", ENV["AWS_ACCESS_KEY_ID"]),
                                              aws_secret_access_key=credentials.get("secret",
                                                                                    ENV["AWS_SECRET_ACCESS_KEY"]))

    def bucket(self, name: str) -> str:
        """A new, empty bucket: s3://NAME."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, url: str) -> dict[str, int]:
        """{key relative to the URL's prefix: bytes} under s3://BUCKET/PREFIX."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        prefix = f"{prefix.strip('/')}/" if prefix else ""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def user_without_permissions(self) -> dict[str, str]:
        """Credentials of an IAM user with no policy: with authorization on, every S3 request is AccessDenied."""
        import boto3
        iam = boto3.session.Session().client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                                             aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                                             aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def authorization(self, on: bool) -> None:
        """Moto's switch: check every request against IAM (on), or accept any credentials (off, the default)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        self._server.stop()


def start_session_server() -> S3Server:
    """Start the server and point this process's environment (inherited by every subprocess) at it."""
    server = S3Server()
    os.environ.update(server.env)
    return server
