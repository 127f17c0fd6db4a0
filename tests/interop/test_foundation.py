"""The foundation seen from real clients: banner and files on first start, SigV4 with boto3
and the AWS CLI, AWS-shaped errors, presigned URLs, restarts and graceful shutdown."""

import json
import subprocess
import time
import urllib.error
import urllib.request

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
from botocore.exceptions import ClientError


def http_get(url):
    """(status, headers with case-insensitive lookup, body)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_first_start_prints_banner_and_writes_credentials_and_ca(mooring):
    log = mooring.log()
    key, secret = mooring.credentials()
    assert key.startswith("AKIA") and len(key) == 20
    assert len(secret) == 40
    assert key in log and secret in log
    assert f"--endpoint-url {mooring.url}" in log
    assert "aws configure set aws_access_key_id" in log
    assert (mooring.data_dir / "ca" / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    aws_config = (mooring.data_dir / "aws-config").read_text()
    assert "[profile mooring]" in aws_config and f"endpoint_url = {mooring.url}" in aws_config
    status, _, body = http_get(mooring.url + "/health")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["endpoints"]["http_url"] == mooring.url


def test_unimplemented_operation_is_a_well_formed_aws_error(mooring):
    sqs = mooring.client("sqs")  # a service Mooring does not serve
    with pytest.raises(ClientError) as err:
        sqs.list_queues()
    error = err.value.response["Error"]
    meta = err.value.response["ResponseMetadata"]
    assert error["Code"] == "UnknownOperationException"
    assert "AmazonSQS.ListQueues" in error["Message"]
    assert meta["HTTPStatusCode"] == 400
    assert len(meta["RequestId"]) == 36


def test_wrong_secret_gets_the_signature_error(mooring):
    sqs = mooring.client("sqs", secret="x" * 40)
    with pytest.raises(ClientError) as err:
        sqs.list_queues()
    assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_unknown_access_key_is_unrecognized(mooring):
    _, secret = mooring.credentials()
    import boto3
    client = boto3.client(
        "sqs", endpoint_url=mooring.url, region_name="us-east-1",
        aws_access_key_id="AKIAUNKNOWNUNKNOWN00", aws_secret_access_key=secret,
    )
    with pytest.raises(ClientError) as err:
        client.list_queues()
    assert err.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_unsigned_request_is_refused(mooring):
    req = urllib.request.Request(
        mooring.url + "/", data=b"{}", method="POST",
        headers={"X-Amz-Target": "AmazonSQS.ListQueues", "Content-Type": "application/x-amz-json-1.0"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("unsigned request was accepted")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert e.code == 403
        assert body["__type"] == "MissingAuthenticationTokenException"
        assert e.headers["x-amzn-RequestId"]


def presign(mooring, path, expires, secret=None):
    key, real_secret = mooring.credentials()
    creds = botocore.credentials.Credentials(key, secret or real_secret)
    request = botocore.awsrequest.AWSRequest(method="GET", url=mooring.url + path)
    botocore.auth.SigV4QueryAuth(creds, "iotdevicegateway", "us-east-1", expires=expires).add_auth(request)
    return request.prepare().url


def test_presigned_urls_verify_and_expire(mooring):
    # A valid presigned URL passes authentication and reaches routing (no service owns it).
    status, headers, body = http_get(presign(mooring, "/no-such-api", 300))
    assert status == 404, body
    assert headers["x-amzn-ErrorType"] == "UnknownOperationException"
    # A wrong secret fails authentication.
    status, headers, _ = http_get(presign(mooring, "/no-such-api", 300, secret="y" * 40))
    assert status == 403 and headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    # An expired one is refused.
    url = presign(mooring, "/no-such-api", 1)
    time.sleep(2.2)
    status, headers, body = http_get(url)
    assert status == 403
    assert headers["x-amzn-ErrorType"] == "RequestExpired"
    assert b"Request has expired" in body


def test_skewed_clock_is_refused(mooring):
    key, secret = mooring.credentials()
    creds = botocore.credentials.Credentials(key, secret)
    request = botocore.awsrequest.AWSRequest(
        method="POST", url=mooring.url + "/", data=b"{}",
        headers={"X-Amz-Target": "AmazonSQS.ListQueues", "Content-Type": "application/x-amz-json-1.0"},
    )
    auth = botocore.auth.SigV4Auth(creds, "sqs", "us-east-1")
    # Sign as if it were 20 minutes ago.
    real = botocore.auth.datetime.datetime
    class Past(real):
        @classmethod
        def utcnow(cls):
            return real.utcnow() - botocore.auth.datetime.timedelta(minutes=20)
        @classmethod
        def now(cls, tz=None):
            return real.now(tz) - botocore.auth.datetime.timedelta(minutes=20)
    botocore.auth.datetime.datetime = Past
    try:
        auth.add_auth(request)
    finally:
        botocore.auth.datetime.datetime = real
    prepared = request.prepare()
    req = urllib.request.Request(prepared.url, data=prepared.body, method="POST", headers=dict(prepared.headers))
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("skewed request was accepted")
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
        assert e.code == 403
        assert body["__type"] == "InvalidSignatureException"
        assert body["message"].startswith("Signature expired")


def test_aws_cli_with_written_profile_files(mooring):
    # AWS CLI v1 ignores endpoint_url in the config file, so it takes --endpoint-url.
    result = subprocess.run(
        ["aws", "sqs", "list-queues", "--endpoint-url", mooring.url],
        env=mooring.cli_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "UnknownOperationException" in result.stderr, result.stderr
    bad_env = mooring.cli_env()
    bad_env["AWS_SECRET_ACCESS_KEY"] = "z" * 40
    bad_env["AWS_ACCESS_KEY_ID"] = mooring.credentials()[0]
    result = subprocess.run(
        ["aws", "sqs", "list-queues", "--endpoint-url", mooring.url, "--region", "us-east-1"],
        env=bad_env, capture_output=True, text=True, timeout=60,
    )
    assert "InvalidSignatureException" in result.stderr, result.stderr


def test_boto3_profile_files_need_no_endpoint_url(mooring, monkeypatch):
    import boto3
    for k, v in mooring.cli_env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    sqs = boto3.Session(profile_name="mooring").client("sqs")
    assert sqs.meta.endpoint_url == mooring.url
    with pytest.raises(ClientError) as err:
        sqs.list_queues()
    assert err.value.response["Error"]["Code"] == "UnknownOperationException"


def test_restart_keeps_credentials_and_ca(mooring):
    before = mooring.credentials()
    ca_before = (mooring.data_dir / "ca" / "ca.pem").read_text()
    assert mooring.stop() == 0, "graceful shutdown exits 0"
    assert "shutdown requested" in mooring.log()
    mooring.start()
    assert mooring.credentials() == before
    assert (mooring.data_dir / "ca" / "ca.pem").read_text() == ca_before
    status, _, _ = http_get(mooring.url + "/health")
    assert status == 200


def test_metrics_count_requests_per_operation(mooring):
    sqs = mooring.client("sqs")
    for _ in range(3):
        with pytest.raises(ClientError):
            sqs.list_queues()
    status, headers, body = http_get(mooring.url + "/metrics")
    assert status == 200
    text = body.decode()
    assert 'mooring_aws_requests_total{service="unknown",operation="unknown",status="400"} 3' in text, text


def test_auth_none_accepts_any_signature_and_warns(mooring_factory):
    m = mooring_factory(extra_args=["--auth", "none"])
    assert "WARNING: auth = \"none\"" in m.log()
    sqs = m.client("sqs", secret="q" * 40)
    with pytest.raises(ClientError) as err:
        sqs.list_queues()
    assert err.value.response["Error"]["Code"] == "UnknownOperationException"


def test_config_file_env_and_flags_precedence(mooring_factory, tmp_path):
    config = tmp_path / "mooring.toml"
    subprocess.run([__import__("conftest").mooring_binary(), "init", "--config", str(config)], check=True)
    text = config.read_text().replace('region = "us-east-1"', 'region = "eu-west-1"').replace(
        'account_id = "000000000000"', 'account_id = "111111111111"')
    config.write_text(text)
    m = mooring_factory(
        extra_args=["--config", str(config), "--account-id", "222222222222"],
        env={"MOORING_REGION": "ap-south-1", "MOORING_ACCOUNT_ID": "333333333333"},
    )
    assert m.endpoints["region"] == "ap-south-1"  # env beats file
    assert m.endpoints["account_id"] == "222222222222"  # flag beats env
