"""Shared fixtures for the interop suite: start the real `mooring` binary on ephemeral ports
with a temporary data directory, and hand tests real AWS clients pointed at it.

The binary is `$TEST_MOORING_BIN` when set (scripts/test sets it to the release build), else
`target/release/mooring` or `target/debug/mooring` under the repository root.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import boto3
import botocore.config
import pytest

REPO = Path(__file__).resolve().parents[2]


def mooring_binary() -> str:
    explicit = os.environ.get("TEST_MOORING_BIN")
    if explicit:
        return explicit
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "mooring"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("no mooring binary: build it or set TEST_MOORING_BIN")


class Mooring:
    """One running `mooring serve` process."""

    def __init__(self, data_dir: Path, extra_args=(), env=None):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.endpoints = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout=30.0):
        endpoints_file = self.data_dir / "endpoints.json"
        if endpoints_file.exists():
            endpoints_file.unlink()
        args = [
            mooring_binary(), "serve",
            "--data-dir", str(self.data_dir),
            "--http-listen", "127.0.0.1:0",
            "--mqtt-listen", "127.0.0.1:0",
            "--mqtts-listen", "127.0.0.1:0",
            "--stream-manager-listen", "127.0.0.1:0",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooring exited with {self.proc.returncode}:\n{self.log()}")
            if endpoints_file.exists():
                try:
                    self.endpoints = json.loads(endpoints_file.read_text())
                    return self
                except json.JSONDecodeError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"mooring did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self):
        """SIGKILL: no chance to flush anything."""
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    @property
    def url(self) -> str:
        return self.endpoints["http_url"]

    def credentials(self):
        """(access key id, secret) from the credentials file Mooring wrote."""
        key = secret = None
        for line in (self.data_dir / "credentials").read_text().splitlines():
            if "=" in line:
                k, v = (p.strip() for p in line.split("=", 1))
                if k == "aws_access_key_id":
                    key = v
                elif k == "aws_secret_access_key":
                    secret = v
        return key, secret

    def client(self, service, secret=None, **kwargs):
        key, real_secret = self.credentials()
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=self.endpoints["region"],
            aws_access_key_id=key,
            aws_secret_access_key=secret or real_secret,
            config=botocore.config.Config(retries={"max_attempts": 1}, **kwargs),
        )

    def cli_env(self):
        """Environment for the AWS CLI using the files Mooring wrote."""
        env = dict(os.environ)
        env.update(
            AWS_SHARED_CREDENTIALS_FILE=self.endpoints["credentials_file"],
            AWS_CONFIG_FILE=self.endpoints["aws_config_file"],
            AWS_PROFILE="mooring",
        )
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            env.pop(k, None)
        return env


@pytest.fixture
def mooring_factory(tmp_path):
    """Starts Mooring processes (each with its own data directory unless one is given)."""
    started = []

    def start(data_dir=None, extra_args=(), env=None):
        data_dir = data_dir or tmp_path / f"data{len(started)}"
        m = Mooring(data_dir, extra_args, env).start()
        started.append(m)
        return m

    yield start
    for m in started:
        try:
            m.stop()
        except Exception:
            pass


@pytest.fixture
def mooring(mooring_factory):
    """A running Mooring with default settings."""
    return mooring_factory()
