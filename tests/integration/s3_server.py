"""A real S3-API endpoint on this machine: moto's standalone server, started for the session.

Import the fixture into the test module (`from s3_server import s3_server`) and request
`s3_server`. It listens on 127.0.0.1 only, holds one bucket, and is stopped by its pid when
the session ends. mosaicml-streaming's own S3 client reaches it through the environment alone
(`S3ServerEnv.env`: S3_ENDPOINT_URL and the usual AWS variables, any values), as a user's run
reaches a private S3-compatible store; nothing of streaming or boto is patched.

Needs `moto_server` (moto[server], in setup.py's test extra); skipped loudly without it.
"""
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.dist import free_port
from loud_skip import skip_loudly

BUCKET = "clipzero-test"
# Any values do: moto checks that a request is signed, not by whom.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "clipzero", "AWS_SECRET_ACCESS_KEY": "clipzero-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class S3ServerEnv:
    endpoint: str  # http://127.0.0.1:PORT

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to read s3://BUCKET/... from this server."""
        return {"S3_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, folder: Path, prefix: str) -> str:
        """Put every file under `folder` at s3://BUCKET/prefix/...; returns that URL."""
        client = self.client()
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"


def moto_server_command() -> str | None:
    """The `moto_server` of the interpreter running the tests (a venv need not be activated)."""
    beside = Path(sys.executable).with_name("moto_server")
    return str(beside) if beside.exists() else shutil.which("moto_server")


def _wait_until_serving(process: subprocess.Popen, endpoint: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited {process.returncode} at start:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    command = moto_server_command()
    if command is None:
        skip_loudly("moto_server not found: install the test extra (pip install -e '.[test]', which has "
                    "moto[server]) to run the remote-data tests against a local S3 endpoint")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "w") as output:
        process = subprocess.Popen([command, "-H", "127.0.0.1", "-p", str(port)], stdout=output,
                                   stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(process, endpoint, log)
        server = S3ServerEnv(endpoint)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
