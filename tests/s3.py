"""A real S3 endpoint on loopback (moto's server, as a separate process) and a trainer's boto3 client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx

BUCKET = "models"
PREFIX = "colours/"
REGION = "us-east-1"
# Every permission on S3: what a trainer's key is given when the server checks credentials.
ALLOW_S3 = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)


@dataclass
class MotoServer:
    """`moto.server` on a fixed port, so it can be stopped and started again at the same address."""

    port: int
    log_path: Path
    # With `auth`, moto checks keys and signatures like S3 does: only the key `start` creates is valid.
    auth: bool = False
    access_key: str = "testing"
    secret_key: str = "testing"
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, deadline: float = 30.0) -> None:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.log_path.parent)}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"  # the 4 setup calls below; every later one is checked
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        end = time.monotonic() + deadline
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"moto server did not start:\n{self.log_path.read_text()}") from None
                time.sleep(0.05)
        self.client().create_bucket(Bucket=BUCKET)
        if self.auth:
            iam = boto3.client("iam", **self._keys())
            iam.create_user(UserName="trainer")
            key = iam.create_access_key(UserName="trainer")["AccessKey"]
            iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=ALLOW_S3)
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def _keys(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.url,
            "region_name": REGION,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }

    def client(self) -> Any:
        """The trainer's side: a plain boto3 client."""
        return boto3.client("s3", **self._keys())

    def upload(self, path: Path, name: str | None = None) -> None:
        """As a trainer uploads: `upload_file`, which goes multipart above 8 MB."""
        self.client().upload_file(str(path), BUCKET, PREFIX + (name or path.name))

    def delete(self, name: str) -> None:
        self.client().delete_object(Bucket=BUCKET, Key=PREFIX + name)

    def env(self, **overrides: str) -> dict[str, str]:
        """What the daemon is given: boto3's standard variables, and no shared config files of this machine."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1",  # an outage shows at the first failed listing; the source backs off itself
            **overrides,
        }


def uri(name: str = "") -> str:
    return f"s3://{BUCKET}/{PREFIX}{name}"
