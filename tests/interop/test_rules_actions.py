"""Rule actions that call out: s3, sqs and kinesis through the AWS SDK crates to moto's
server, the http action's SigV4 signing checked with botocore's signer, SQL functions
that read Mooring's own data (get_registry_data, aws_lambda), and the durable action
journal surviving a SIGKILL. Rules are created with boto3 and messages published with
paho."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from test_mqtt import Client

ROLE = "arn:aws:iam::000000000000:role/rules"
MOTO_KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto():
    """moto's server on an ephemeral port, from the venv running the tests."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def outbound_env(moto_url):
    return {
        "MOORING_IOT__OUTBOUND__ENDPOINT_URL": moto_url,
        "MOORING_IOT__OUTBOUND__ACCESS_KEY_ID": "testing",
        "MOORING_IOT__OUTBOUND__SECRET_ACCESS_KEY": "testing",
        "MOORING_IOT__OUTBOUND__REGION": "us-east-1",
    }


def rule(sql, actions, error_action=None):
    payload = {"sql": sql, "awsIotSqlVersion": "2016-03-23", "ruleDisabled": False, "actions": actions}
    if error_action:
        payload["errorAction"] = error_action
    return payload


def eventually(fetch, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_s3_sqs_and_kinesis_actions_reach_moto(mooring_factory, moto):
    s3 = boto3.client("s3", endpoint_url=moto, **MOTO_KEYS)
    sqs = boto3.client("sqs", endpoint_url=moto, **MOTO_KEYS)
    kinesis = boto3.client("kinesis", endpoint_url=moto, **MOTO_KEYS)
    s3.create_bucket(Bucket="rules-out")
    plain = sqs.create_queue(QueueName="rules-plain")["QueueUrl"]
    encoded = sqs.create_queue(QueueName="rules-b64")["QueueUrl"]
    kinesis.create_stream(StreamName="rules-stream", ShardCount=1)
    eventually(lambda: kinesis.describe_stream(StreamName="rules-stream")["StreamDescription"]["StreamStatus"] == "ACTIVE")

    m = mooring_factory(env=outbound_env(moto))
    iot = m.client("iot")
    iot.create_topic_rule(ruleName="to_s3", topicRulePayload=rule(
        "SELECT temp, topic(2) AS device FROM 'plant/+/temp'",
        [{"s3": {"roleArn": ROLE, "bucketName": "rules-out",
                 "key": "${replace(topic(), '/', '-')}/${seq}.json", "cannedAcl": "private"}}]))
    iot.create_topic_rule(ruleName="to_sqs", topicRulePayload=rule(
        "SELECT * FROM 'plant/+/temp' WHERE temp > 50",
        [{"sqs": {"roleArn": ROLE, "queueUrl": plain, "useBase64": False}},
         {"sqs": {"roleArn": ROLE, "queueUrl": encoded, "useBase64": True}}]))
    iot.create_topic_rule(ruleName="to_kinesis", topicRulePayload=rule(
        "SELECT temp, seq FROM 'plant/+/temp'",
        [{"kinesis": {"roleArn": ROLE, "streamName": "rules-stream", "partitionKey": "${topic(2)}-${seq}"}}]))

    device = Client(m, client_id="plant-sensor")
    device.pub("plant/boiler/temp", json.dumps({"temp": 75, "seq": 7}).encode(), 1)
    device.pub("plant/fridge/temp", json.dumps({"temp": 4, "seq": 8}).encode(), 1)

    obj = eventually(lambda: _get_object(s3, "rules-out", "plant-boiler-temp/7.json"))
    assert json.loads(obj) == {"temp": 75, "device": "boiler"}
    assert json.loads(eventually(lambda: _get_object(s3, "rules-out", "plant-fridge-temp/8.json"))) == {
        "temp": 4, "device": "fridge"}

    body = eventually(lambda: _receive(sqs, plain))
    assert json.loads(body) == {"temp": 75, "seq": 7}
    b64 = eventually(lambda: _receive(sqs, encoded))
    assert json.loads(base64.b64decode(b64)) == {"temp": 75, "seq": 7}
    assert _receive(sqs, plain) is None  # the fridge reading did not pass the WHERE clause

    shard = kinesis.describe_stream(StreamName="rules-stream")["StreamDescription"]["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(StreamName="rules-stream", ShardId=shard,
                                          ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    records = []

    def read():
        nonlocal iterator
        out = kinesis.get_records(ShardIterator=iterator)
        iterator = out["NextShardIterator"]
        records.extend(out["Records"])
        return len(records) >= 2

    eventually(read)
    by_key = {r["PartitionKey"]: json.loads(r["Data"]) for r in records}
    assert by_key == {"boiler-7": {"temp": 75, "seq": 7}, "fridge-8": {"temp": 4, "seq": 8}}

    metrics = urllib.request.urlopen(f"{m.url}/metrics").read().decode()
    assert 'mooring_iot_rule_actions_total{rule="to_sqs",action="sqs",outcome="success"} 2' in metrics, metrics
    assert 'mooring_iot_rule_matches_total{rule="to_sqs"} 1' in metrics
    assert 'mooring_iot_rule_evaluations_total{rule="to_sqs"} 2' in metrics
    device.stop()


def _get_object(s3, bucket, key):
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def _receive(sqs, url):
    out = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1, MaxNumberOfMessages=1)
    messages = out.get("Messages", [])
    if not messages:
        return None
    sqs.delete_message(QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"])
    return messages[0]["Body"]


def test_failed_outbound_action_sends_aws_error_payload(mooring_factory, moto):
    m = mooring_factory(env=outbound_env(moto))
    iot = m.client("iot")
    iot.create_topic_rule(ruleName="missing_bucket", topicRulePayload=rule(
        "SELECT * FROM 'err/in'",
        [{"s3": {"roleArn": ROLE, "bucketName": "no-such-bucket-here", "key": "k"}}],
        error_action={"republish": {"roleArn": ROLE, "topic": "err/out", "qos": 1}}))
    watcher = Client(m)
    watcher.sub("err/out", 1)
    device = Client(m, client_id="err-device")
    device.pub("err/in", b'{"a":1}', 1)
    error = json.loads(watcher.expect("err/out", timeout=20).payload)
    assert error["ruleName"] == "missing_bucket"
    assert error["topic"] == "err/in"
    assert error["clientId"] == "err-device"
    assert base64.b64decode(error["base64OriginalPayload"]) == b'{"a":1}'
    [failure] = error["failures"]
    assert failure["failedAction"] == "S3Action"
    assert failure["failedResource"] == "no-such-bucket-here"
    assert "NoSuchBucket" in failure["errorMessage"]
    assert set(error) == {"ruleName", "topic", "cloudwatchTraceId", "clientId", "base64OriginalPayload", "failures"}
    watcher.stop()
    device.stop()


class Recorder(BaseHTTPRequestHandler):
    requests = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Recorder.requests.append((self.path, dict(self.headers.items()), body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_action_sigv4_signature_verifies_with_botocore(mooring_factory):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    m = mooring_factory(env={
        "MOORING_IOT__OUTBOUND__ACCESS_KEY_ID": "AKIDRULESSIGNING",
        "MOORING_IOT__OUTBOUND__SECRET_ACCESS_KEY": "s" * 40,
    })
    iot = m.client("iot")
    iot.create_topic_rule(ruleName="signed_http", topicRulePayload=rule(
        "SELECT * FROM 'signed/+'",
        [{"http": {"url": f"http://127.0.0.1:{port}/hook/${{topic(2)}}",
                   "headers": [{"key": "x-device", "value": "${clientid()}"}],
                   "auth": {"sigv4": {"signingRegion": "eu-west-1", "serviceName": "execute-api",
                                      "roleArn": ROLE}}}}]))
    with pytest.raises(iot.exceptions.InvalidRequestException):
        iot.create_topic_rule(ruleName="bad_auth", topicRulePayload=rule(
            "SELECT * FROM 'x'", [{"http": {"url": "https://example.com", "auth": {"sigv4": {"roleArn": ROLE, "signingRegion": "", "serviceName": "execute-api"}}}}]))
    device = Client(m, client_id="signer-1")
    device.pub("signed/door", b'{"open":true}', 1)
    path, headers, body = eventually(lambda: Recorder.requests and Recorder.requests[-1])
    assert path == "/hook/door"
    assert headers["x-device"] == "signer-1"
    assert body == b'{"open":true}'
    auth = headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDRULESSIGNING/")
    assert "/eu-west-1/execute-api/aws4_request" in auth
    # Recompute the signature with botocore over the same request and time.
    signed_names = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    request = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}/hook/door", data=body,
                         headers={k: headers[k] for k in signed_names if k not in ("host", "x-amz-date")})
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials("AKIDRULESSIGNING", "s" * 40), "execute-api", "eu-west-1")
    signer._timestamp = headers["x-amz-date"]
    request.headers["X-Amz-Date"] = headers["x-amz-date"]
    canonical = signer.canonical_request(request)
    string_to_sign = signer.string_to_sign(request, canonical)
    expected = signer.signature(string_to_sign, request)
    assert auth.endswith(f"Signature={expected}"), (auth, canonical)
    device.stop()
    server.shutdown()


def test_get_registry_data_and_aws_lambda_in_sql(mooring_factory, tmp_path):
    script = tmp_path / "double.py"
    script.write_text("import json,sys\nv=json.load(sys.stdin)\nprint(json.dumps({'doubled': v['n']*2}))\n")
    config = tmp_path / "functions.toml"
    config.write_text(f'[iot.functions.doubler]\ncommand = ["{sys.executable}", "{script}"]\n')
    m = mooring_factory(extra_args=["--config", str(config)])
    iot = m.client("iot")
    iot.create_thing(thingName="pump-7", attributePayload={"attributes": {"site": "north"}})
    iot.create_topic_rule(ruleName="enrich", topicRulePayload=rule(
        "SELECT get_registry_data('DescribeThing', topic(2), '" + ROLE + "').attributes.site AS site, "
        "get_registry_data('DescribeThing', 'nobody', '" + ROLE + "') AS missing, "
        "aws_lambda('arn:aws:lambda:us-east-1:000000000000:function:doubler', {'n': n}).doubled AS twice, "
        "get_thing_shadow(topic(2), '" + ROLE + "') AS shadow FROM 'pumps/+'",
        [{"republish": {"roleArn": ROLE, "topic": "enriched/${topic(2)}", "qos": 1}}]))
    watcher = Client(m)
    watcher.sub("enriched/#", 1)
    device = Client(m)
    device.pub("pumps/pump-7", b'{"n": 21}', 1)
    out = json.loads(watcher.expect("enriched/pump-7", timeout=20).payload)
    assert out == {"site": "north", "twice": 42}  # Undefined members are left out
    watcher.stop()
    device.stop()


def test_matched_executions_survive_sigkill(mooring_factory, tmp_path):
    """A QoS 1 publish whose rule matched is acknowledged only once the execution is in the
    journal; killed before the action could run, the action runs after the restart."""
    hits = tmp_path / "hits.log"
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")  # never finishes before the kill
    script.chmod(0o755)
    fast = tmp_path / "fast.sh"
    fast.write_text(f"#!/bin/sh\nline=$(cat)\nprintf '%s\\n' \"$line\" >> {hits}\n")
    fast.chmod(0o755)
    slow_config = tmp_path / "slow.toml"
    slow_config.write_text(f'[iot.functions.sink]\ncommand = ["{script}"]\n')
    fast_config = tmp_path / "fast.toml"
    fast_config.write_text(f'[iot.functions.sink]\ncommand = ["{fast}"]\n')
    data = tmp_path / "durable"
    m = mooring_factory(data_dir=data, extra_args=["--config", str(slow_config)])
    m.client("iot").create_topic_rule(ruleName="durable", topicRulePayload=rule(
        "SELECT n FROM 'durable/in'", [{"lambda": {"functionArn": "sink"}}]))
    device = Client(m)
    for n in range(20):
        device.pub("durable/in", json.dumps({"n": n}).encode(), 1)  # waits for PUBACK
    device.stop()
    m.kill()
    assert not hits.exists()
    m.extra_args = ["--config", str(fast_config)]
    m.start()
    text = eventually(lambda: hits.exists() and hits.read_text().count("\n") >= 20 and hits.read_text())
    seen = sorted(json.loads(line)["n"] for line in text.splitlines() if line.strip())
    assert seen == list(range(20))
    # Finished executions leave the journal: another restart replays nothing.
    time.sleep(0.5)
    m.kill()
    m.start()
    time.sleep(1.5)
    assert hits.read_text().count("\n") == 20
