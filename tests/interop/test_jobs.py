"""IoT Jobs interop: the official awsiotsdk `iotjobs` client over mTLS, raw paho clients on
every device topic, boto3 for the control plane (`iot`) and the HTTP device API
(`iot-jobs-data`), and the same control-plane calls against moto's server.

Covers every device topic and rejected code Mooring can produce on demand, replies reaching
only the requesting connection, notify / notify-next exactly when the pending set or the next
execution changes, step and in-progress timeouts and retries (with a short "minute"),
rollout rate limiting, abort criteria, CONTINUOUS targeting through thing groups, cancel and
delete, job events, and a SIGKILL in the middle of a rollout.

The device certificate for the awsiotsdk test is issued from Mooring's CA files in the data
directory (as in test_mqtt.py) until CreateKeysAndCertificate lands.
"""

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import botocore.exceptions
import pytest

from test_mqtt import V5, Client, issue_client_certificate
from sdk_events import SdkEvents

MINUTE_MS = 1000


def short_minute(ms=MINUTE_MS, *extra):
    return ["--set", f"iot.jobs.minute_ms={ms}", *extra]


class Device:
    """A paho client acting for one thing, with a buffer of everything it received."""

    def __init__(self, m, thing, client_id=None, subscribe=True, **kw):
        self.thing = thing
        self.client = Client(m, client_id=client_id or f"{thing}-{uuid.uuid4().hex[:4]}", **kw)
        self.seen = []
        if subscribe:
            self.client.sub(f"$aws/things/{thing}/jobs/notify", 1)
            self.client.sub(f"$aws/things/{thing}/jobs/notify-next", 1)

    def topic(self, suffix):
        return f"$aws/things/{self.thing}/jobs/{suffix}"

    def wait_for(self, predicate, timeout=5.0, what="message"):
        deadline = time.time() + timeout
        while True:
            for i, msg in enumerate(self.seen):
                if predicate(msg):
                    return self.seen.pop(i)
            remaining = deadline - time.time()
            if remaining <= 0:
                raise AssertionError(f"no {what}; saw {[m.topic for m in self.seen]}")
            try:
                self.seen.append(self.client.messages.get(timeout=min(remaining, 0.2)))
            except queue.Empty:
                pass

    def drain(self, settle=0.3):
        time.sleep(settle)
        while True:
            try:
                self.seen.append(self.client.messages.get_nowait())
            except queue.Empty:
                break
        out, self.seen = self.seen, []
        return out

    def message(self, topic, timeout=5.0):
        return json.loads(self.wait_for(lambda m: m.topic == topic, timeout, topic).payload)

    def request(self, suffix, payload=None, raw=None, qos=1):
        """Publishes a request; returns ("accepted" | "rejected", reply payload)."""
        topic = self.topic(suffix)
        body = raw if raw is not None else json.dumps(payload if payload is not None else {})
        self.client.pub(topic, body, qos)
        msg = self.wait_for(lambda m: m.topic in (f"{topic}/accepted", f"{topic}/rejected"),
                            what=f"reply to {topic}")
        return msg.topic.rsplit("/", 1)[1], json.loads(msg.payload)

    def stop(self):
        self.client.stop()


def new_thing(iot, name=None):
    name = name or f"t-{uuid.uuid4().hex[:8]}"
    return name, iot.create_thing(thingName=name)["thingArn"]


def create_job(iot, targets, document=None, **kw):
    job_id = kw.pop("jobId", f"job-{uuid.uuid4().hex[:8]}")
    iot.create_job(jobId=job_id, targets=targets,
                   document=json.dumps(document or {"operation": "noop"}), **kw)
    return job_id


def process(iot, job_id):
    return iot.describe_job(jobId=job_id)["job"]["jobProcessDetails"]


def execution(iot, thing, job_id, **kw):
    return iot.describe_job_execution(thingName=thing, jobId=job_id, **kw)["execution"]


def wait_until(predicate, timeout=10.0, step=0.05, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def is_seconds(ts):
    return isinstance(ts, int) and 1_600_000_000 < ts < 10_000_000_000


SUMMARY_KEYS = {"jobId", "queuedAt", "lastUpdatedAt", "versionNumber", "executionNumber"}
EXECUTION_KEYS = {"jobId", "thingName", "jobDocument", "status", "queuedAt", "lastUpdatedAt",
                  "versionNumber", "executionNumber"}


# ----------------------------------------------------------------------- awsiotsdk, end to end

def test_awsiotsdk_jobs_client_runs_a_job_end_to_end(mooring, tmp_path):
    """AWS's jobs sample, step by step: subscribe, start-next, update to SUCCEEDED, and the
    notify-next for the following job."""
    from awscrt import mqtt as crt_mqtt
    from awsiot import iotjobs, mqtt_connection_builder

    iot = mooring.client("iot")
    thing, thing_arn = new_thing(iot)
    cert_path, key_path, _ = issue_client_certificate(mooring, tmp_path)
    port = int(mooring.endpoints["mqtts"].rsplit(":", 1)[1])
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=port, cert_filepath=str(cert_path),
        pri_key_filepath=str(key_path), ca_filepath=str(mooring.data_dir / "ca" / "ca.pem"),
        client_id=thing, clean_session=False, keep_alive_secs=30)
    connection.connect().result(10)
    jobs = iotjobs.IotJobsClient(connection)
    events = SdkEvents()
    on, expect = events.on, events.expect

    qos = crt_mqtt.QoS.AT_LEAST_ONCE
    subscriptions = [
        jobs.subscribe_to_next_job_execution_changed_events(
            iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), qos,
            on("next")),
        jobs.subscribe_to_start_next_pending_job_execution_accepted(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), qos,
            on("start_accepted")),
        jobs.subscribe_to_start_next_pending_job_execution_rejected(
            iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing), qos,
            on("start_rejected")),
        jobs.subscribe_to_update_job_execution_accepted(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), qos,
            on("update_accepted")),
        jobs.subscribe_to_update_job_execution_rejected(
            iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+"), qos,
            on("update_rejected")),
        jobs.subscribe_to_get_pending_job_executions_accepted(
            iotjobs.GetPendingJobExecutionsSubscriptionRequest(thing_name=thing), qos,
            on("pending")),
    ]
    for future, _ in subscriptions:
        future.result(10)

    first = create_job(iot, [thing_arn], {"operation": "install", "version": "1.0"})
    changed = expect("next")
    assert changed.execution.job_id == first
    assert changed.execution.job_document == {"operation": "install", "version": "1.0"}
    assert changed.execution.status == "QUEUED"

    jobs.publish_get_pending_job_executions(
        iotjobs.GetPendingJobExecutionsRequest(thing_name=thing, client_token="tok-1"), qos).result(10)
    pending = expect("pending")
    assert pending.client_token == "tok-1"
    assert [j.job_id for j in pending.queued_jobs] == [first]
    assert pending.in_progress_jobs == []

    jobs.publish_start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(
            thing_name=thing, step_timeout_in_minutes=15, client_token="tok-2"), qos).result(10)
    started = expect("start_accepted")
    assert started.client_token == "tok-2"
    assert started.execution.job_id == first
    assert started.execution.status == "IN_PROGRESS"
    assert started.execution.version_number == 2
    # The SDK parses timestamps as epoch seconds: a millisecond value would land in the far future.
    assert abs(started.timestamp.timestamp() - time.time()) < 120

    second = create_job(iot, [thing_arn], {"operation": "reboot"})
    jobs.publish_update_job_execution(
        iotjobs.UpdateJobExecutionRequest(
            thing_name=thing, job_id=first, status="SUCCEEDED",
            status_details={"progress": "done"}, expected_version=2,
            include_job_execution_state=True, client_token="tok-3"), qos).result(10)
    updated = expect("update_accepted")
    assert updated.client_token == "tok-3"
    assert updated.execution_state.status == "SUCCEEDED"
    assert updated.execution_state.version_number == 3
    assert updated.execution_state.status_details == {"progress": "done"}

    following = expect("next")
    assert following.execution.job_id == second
    assert following.execution.job_document == {"operation": "reboot"}
    assert all(name != "start_rejected" for name, _ in events.held + list(events.events.queue))
    connection.disconnect().result(10)
    assert execution(iot, thing, first)["status"] == "SUCCEEDED"
    assert iot.describe_job(jobId=first)["job"]["status"] == "COMPLETED"


# ------------------------------------------------------------------------ raw paho, every topic

def test_every_device_topic_with_exact_shapes(mooring):
    iot = mooring.client("iot")
    thing, thing_arn = new_thing(iot)
    dev = Device(mooring, thing)
    document = {"operation": "update", "files": ["a.bin"]}
    job_id = create_job(iot, [thing_arn], document, description="first")

    notify = dev.message(dev.topic("notify"))
    assert set(notify) == {"timestamp", "jobs"} and is_seconds(notify["timestamp"])
    assert list(notify["jobs"]) == ["QUEUED"]
    assert set(notify["jobs"]["QUEUED"][0]) == SUMMARY_KEYS
    assert notify["jobs"]["QUEUED"][0]["versionNumber"] == 1
    assert notify["jobs"]["QUEUED"][0]["executionNumber"] == 1
    nxt = dev.message(dev.topic("notify-next"))
    assert set(nxt["execution"]) == EXECUTION_KEYS
    assert nxt["execution"]["jobDocument"] == document

    kind, reply = dev.request("get", {"clientToken": "c1"})
    assert kind == "accepted"
    assert set(reply) == {"inProgressJobs", "queuedJobs", "timestamp", "clientToken"}
    assert reply["clientToken"] == "c1" and is_seconds(reply["timestamp"])
    assert [j["jobId"] for j in reply["queuedJobs"]] == [job_id]
    assert all(is_seconds(reply["queuedJobs"][0][k]) for k in ("queuedAt", "lastUpdatedAt"))

    kind, reply = dev.request("$next/get", {"clientToken": "c2"})
    assert kind == "accepted" and reply["execution"]["jobId"] == job_id
    assert reply["execution"]["jobDocument"] == document
    kind, reply = dev.request(f"{job_id}/get", {"includeJobDocument": False})
    assert kind == "accepted" and "jobDocument" not in reply["execution"]
    assert "clientToken" not in reply

    kind, reply = dev.request("start-next", {"statusDetails": {"step": "download"},
                                             "clientToken": "c3"})
    assert kind == "accepted"
    e = reply["execution"]
    assert e["status"] == "IN_PROGRESS" and e["versionNumber"] == 2
    assert e["statusDetails"] == {"step": "download"} and is_seconds(e["startedAt"])
    # QUEUED -> IN_PROGRESS of the same next execution announces nothing.
    assert not [m for m in dev.drain() if m.topic.endswith(("/notify", "/notify-next"))]

    kind, reply = dev.request(f"{job_id}/update", {
        "status": "IN_PROGRESS", "statusDetails": {"step": "install"}, "expectedVersion": 2,
        "includeJobExecutionState": True, "clientToken": "c4"})
    assert kind == "accepted"
    assert reply["executionState"] == {"status": "IN_PROGRESS", "versionNumber": 3,
                                       "statusDetails": {"step": "install"}}
    assert "jobDocument" not in reply
    assert not [m for m in dev.drain() if m.topic.endswith(("/notify", "/notify-next"))]

    kind, reply = dev.request(f"{job_id}/update", {"status": "SUCCEEDED",
                                                   "includeJobDocument": True})
    assert kind == "accepted" and reply["jobDocument"] == document
    assert set(reply) == {"jobDocument", "timestamp"}
    assert dev.message(dev.topic("notify"))["jobs"] == {}
    assert set(dev.message(dev.topic("notify-next"))) == {"timestamp"}

    kind, reply = dev.request("start-next", {"clientToken": "c5"})
    assert kind == "accepted" and set(reply) == {"timestamp", "clientToken"}
    kind, reply = dev.request("$next/get", {})
    assert kind == "accepted" and set(reply) == {"timestamp"}

    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "COMPLETED" and job["description"] == "first"
    assert job["jobProcessDetails"]["numberOfSucceededThings"] == 1
    e = execution(iot, thing, job_id)
    assert e["statusDetails"] == {"detailsMap": {"step": "install"}}
    assert e["thingArn"] == thing_arn and e["versionNumber"] == 4
    dev.stop()


def test_notify_next_only_when_the_next_execution_changes(mooring):
    iot = mooring.client("iot")
    thing, arn = new_thing(iot)
    dev = Device(mooring, thing)
    first = create_job(iot, [arn])
    assert dev.message(dev.topic("notify-next"))["execution"]["jobId"] == first
    dev.drain()
    second = create_job(iot, [arn])
    got = dev.drain(0.5)
    assert [m.topic for m in got] == [dev.topic("notify")], "a second job changes only the set"
    assert [j["jobId"] for j in json.loads(got[0].payload)["jobs"]["QUEUED"]] == [first, second]
    # A later QUEUED entry becoming IN_PROGRESS becomes the next one.
    assert dev.request(f"{second}/update", {"status": "IN_PROGRESS"})[0] == "accepted"
    got = dev.drain(0.5)
    assert [m.topic for m in got] == [dev.topic("notify-next")]
    assert json.loads(got[0].payload)["execution"]["jobId"] == second
    # Canceling the other (QUEUED) one changes the set, not the next.
    iot.cancel_job(jobId=first)
    got = dev.drain(0.5)
    assert [m.topic for m in got] == [dev.topic("notify")]
    assert list(json.loads(got[0].payload)["jobs"]) == ["IN_PROGRESS"]
    dev.stop()


def test_every_rejected_code(mooring_factory):
    m = mooring_factory(extra_args=["--set", "iot.jobs.device_requests_per_second=20"])
    iot = m.client("iot")
    thing, arn = new_thing(iot)
    dev = Device(m, thing, subscribe=False)
    job_id = create_job(iot, [arn])
    other = create_job(iot, [arn])

    kind, r = dev.request(f"{job_id}/bogus", {"clientToken": "x"})
    assert (kind, r["code"], r["clientToken"]) == ("rejected", "InvalidTopic", "x")
    kind, r = dev.request("get", raw=b"{not json")
    assert (kind, r["code"]) == ("rejected", "InvalidJson")
    assert set(r) == {"code", "message", "timestamp"} and is_seconds(r["timestamp"])
    kind, r = dev.request("get", raw=b"\xff\xfe")
    assert r["code"] == "InvalidJson"
    kind, r = dev.request(f"{job_id}/update", {"status": "DONE", "clientToken": "t1"})
    assert (r["code"], r["clientToken"]) == ("InvalidRequest", "t1")
    kind, r = dev.request(f"{job_id}/update", {"status": "QUEUED"})
    assert r["code"] == "InvalidRequest"
    kind, r = dev.request(f"{job_id}/update", {"status": "IN_PROGRESS",
                                               "statusDetails": {"bad key": "v"}})
    assert r["code"] == "InvalidRequest"
    kind, r = dev.request("start-next", {"stepTimeoutInMinutes": 0})
    assert r["code"] == "InvalidRequest"
    kind, r = dev.request("no-such-job/get", {})
    assert (kind, r["code"]) == ("rejected", "ResourceNotFound")
    kind, r = dev.request("no-such-job/update", {"status": "SUCCEEDED"})
    assert r["code"] == "ResourceNotFound"

    kind, r = dev.request(f"{job_id}/update", {"status": "IN_PROGRESS", "expectedVersion": 9,
                                               "clientToken": "v"})
    assert (r["code"], r["clientToken"]) == ("VersionMismatch", "v")
    assert r["executionState"] == {"status": "QUEUED", "versionNumber": 1}

    assert dev.request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "accepted"
    kind, r = dev.request(f"{job_id}/update", {"status": "IN_PROGRESS"})
    assert r["code"] == "InvalidStateTransition"
    assert r["executionState"] == {"status": "SUCCEEDED", "versionNumber": 2}

    # The job is COMPLETED once its only execution succeeded: describing it is terminal.
    kind, r = dev.request(f"{job_id}/get", {})
    assert r["code"] == "TerminalStateReached"
    # An execution that is terminal while its job still runs is still describable.
    _, second_arn = new_thing(iot)
    running = create_job(iot, [arn, second_arn])
    assert dev.request(f"{running}/update", {"status": "FAILED"})[0] == "accepted"
    kind, r = dev.request(f"{running}/get", {})
    assert kind == "accepted" and r["execution"]["status"] == "FAILED"
    assert dev.request(f"{other}/update", {"status": "REJECTED"})[0] == "accepted"
    kind, r = dev.request(f"{other}/get", {})
    assert r["code"] == "TerminalStateReached"

    time.sleep(1.1)  # a fresh throttling second
    results = []
    for _ in range(40):
        dev.client.pub(dev.topic("get"), b"{}", 0, wait=False)
    deadline = time.time() + 5
    while len(results) < 40 and time.time() < deadline:
        try:
            msg = dev.client.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg.topic.startswith(dev.topic("get/")):
            results.append(json.loads(msg.payload))
    codes = [r.get("code") for r in results]
    assert "RequestThrottled" in codes, codes
    assert codes.count(None) >= 1
    dev.stop()


def test_replies_reach_only_the_requesting_connection(mooring):
    iot = mooring.client("iot")
    thing, arn = new_thing(iot)
    spy = Client(mooring, client_id="spy")
    spy.sub("$aws/things/+/jobs/#", 1)
    exact = Client(mooring, client_id="exact", protocol=V5)
    exact.sub(f"$aws/things/{thing}/jobs/get/accepted", 1)
    exact.sub(f"$aws/things/{thing}/jobs/start-next/accepted", 1)
    dev = Device(mooring, thing, subscribe=False)
    job_id = create_job(iot, [arn])
    assert dev.request("get", {})[0] == "accepted"
    assert dev.request("start-next", {})[0] == "accepted"
    assert dev.request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "accepted"
    assert dev.request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "rejected"
    time.sleep(0.5)
    seen = []
    while True:
        try:
            seen.append(spy.messages.get_nowait().topic)
        except queue.Empty:
            break
    assert seen, "the spy sees the requests and notifications"
    assert not [t for t in seen if t.endswith(("/accepted", "/rejected"))], seen
    assert f"$aws/things/{thing}/jobs/notify" in seen
    exact.nothing(0.3)
    dev.stop()


# --------------------------------------------------------------------- timers, retries, rollouts

def test_in_progress_and_step_timeouts_and_retries(mooring_factory):
    m = mooring_factory(extra_args=short_minute(500))
    iot = m.client("iot")
    thing, arn = new_thing(iot)
    dev = Device(m, thing, subscribe=False)

    in_progress = create_job(iot, [arn], timeoutConfig={"inProgressTimeoutInMinutes": 2})
    started = time.time()
    kind, r = dev.request("start-next", {})
    assert r["execution"]["jobId"] == in_progress
    e = execution(iot, thing, in_progress)
    assert 0 < e["approximateSecondsBeforeTimedOut"] <= 1
    wait_until(lambda: execution(iot, thing, in_progress)["status"] == "TIMED_OUT", 5,
               what="in-progress timeout")
    assert time.time() - started >= 0.9
    assert dev.request(f"{in_progress}/update", {"status": "SUCCEEDED"})[1]["code"] == \
        "InvalidStateTransition"

    step = create_job(iot, [arn], jobExecutionsRetryConfig={
        "criteriaList": [{"failureType": "TIMED_OUT", "numberOfRetries": 1}]})
    kind, r = dev.request("start-next", {"stepTimeoutInMinutes": 1})
    assert r["execution"]["jobId"] == step
    # A new step timer replaces the old one.
    kind, r = dev.request(f"{step}/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 4})
    assert kind == "accepted"
    time.sleep(1.0)
    assert execution(iot, thing, step)["status"] == "IN_PROGRESS"
    wait_until(lambda: execution(iot, thing, step, executionNumber=1)["status"] == "TIMED_OUT",
               5, what="step timeout")
    # The retry queued execution 2.
    retried = execution(iot, thing, step)
    assert (retried["executionNumber"], retried["status"]) == (2, "QUEUED")
    summaries = iot.list_job_executions_for_thing(thingName=thing)["executionSummaries"]
    summary = next(s for s in summaries if s["jobId"] == step)["jobExecutionSummary"]
    assert summary["retryAttempt"] == 1 and summary["executionNumber"] == 2
    kind, r = dev.request("start-next", {"stepTimeoutInMinutes": 1})
    assert r["execution"]["executionNumber"] == 2
    wait_until(lambda: execution(iot, thing, step)["status"] == "TIMED_OUT", 5)
    time.sleep(0.6)
    assert execution(iot, thing, step)["executionNumber"] == 2, "only one retry was allowed"
    assert iot.describe_job(jobId=step)["job"]["status"] == "COMPLETED"
    dev.stop()


def test_rollout_rate_limiting(mooring_factory):
    m = mooring_factory(extra_args=short_minute(1500))
    iot = m.client("iot")
    arns = [new_thing(iot)[1] for _ in range(5)]
    job_id = create_job(iot, arns, jobExecutionsRolloutConfig={"maximumPerMinute": 2})
    created = time.time()
    queued = lambda: process(iot, job_id)["numberOfQueuedThings"]  # noqa: E731
    assert queued() == 2
    assert iot.describe_job(jobId=job_id)["job"]["isConcurrent"] is True
    time.sleep(0.8)
    assert queued() == 2
    wait_until(lambda: queued() == 4, 5, what="second minute")
    assert time.time() - created >= 1.3
    wait_until(lambda: queued() == 5, 5, what="third minute")
    assert time.time() - created >= 2.8
    assert iot.describe_job(jobId=job_id)["job"]["isConcurrent"] is False
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["jobExecutionsRolloutConfig"] == {"maximumPerMinute": 2}


def test_exponential_rollout_grows_with_notified_things(mooring_factory):
    m = mooring_factory(extra_args=short_minute(1500))
    iot = m.client("iot")
    arns = [new_thing(iot)[1] for _ in range(6)]
    job_id = create_job(iot, arns, jobExecutionsRolloutConfig={"exponentialRate": {
        "baseRatePerMinute": 1, "incrementFactor": 2,
        "rateIncreaseCriteria": {"numberOfNotifiedThings": 1}}})
    queued = lambda: process(iot, job_id)["numberOfQueuedThings"]  # noqa: E731
    assert queued() == 1
    time.sleep(0.8)
    assert queued() == 1, "the rate holds for the whole minute"
    # One notified thing: the next minute's rate is 2; three notified: 8.
    wait_until(lambda: queued() >= 2, 5)
    time.sleep(0.3)
    assert queued() == 3
    wait_until(lambda: queued() == 6, 8)


def test_abort_criteria_cancel_the_job(mooring):
    iot = mooring.client("iot")
    things = [new_thing(iot) for _ in range(4)]
    job_id = create_job(iot, [a for _, a in things], abortConfig={"criteriaList": [{
        "failureType": "FAILED", "action": "CANCEL", "thresholdPercentage": 50,
        "minNumberOfExecutedThings": 2}]})
    devices = [Device(mooring, t, subscribe=False) for t, _ in things[:3]]
    assert devices[2].request("start-next", {})[0] == "accepted"
    assert devices[0].request(f"{job_id}/update", {"status": "FAILED"})[0] == "accepted"
    assert iot.describe_job(jobId=job_id)["job"]["status"] == "IN_PROGRESS"
    assert devices[1].request(f"{job_id}/update", {"status": "FAILED"})[0] == "accepted"
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "CANCELED"
    assert job["jobProcessDetails"]["numberOfFailedThings"] == 2
    assert job["jobProcessDetails"]["numberOfCanceledThings"] == 1
    # The IN_PROGRESS execution continues.
    assert execution(iot, things[2][0], job_id)["status"] == "IN_PROGRESS"
    assert execution(iot, things[3][0], job_id)["status"] == "CANCELED"
    assert devices[2].request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "accepted"
    for d in devices:
        d.stop()


def test_cli_lists_jobs_and_shows_per_status_counts(mooring):
    from conftest import mooring_binary

    iot = mooring.client("iot")
    (a, a_arn), (b, b_arn), (c, c_arn) = (new_thing(iot, n) for n in ("cli-a", "cli-b", "cli-c"))
    job_id = create_job(iot, [a_arn, b_arn, c_arn], jobId="cli-job",
                        document={"operation": "reboot"}, description="reboot the fleet")
    create_job(iot, [c_arn], jobId="cli-continuous", targetSelection="CONTINUOUS")
    dev_a, dev_b = Device(mooring, a, subscribe=False), Device(mooring, b, subscribe=False)
    assert dev_a.request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "accepted"
    assert dev_b.request(f"{job_id}/update", {"status": "IN_PROGRESS"})[0] == "accepted"

    def cli(*args):
        result = subprocess.run([mooring_binary(), "jobs", *args, "--data-dir", str(mooring.data_dir)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    listing = cli("ls")
    assert listing[0].split() == ["JOB", "STATUS", "TARGETS", "BACKLOG", "EXECUTIONS"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert set(rows) == {"cli-job", "cli-continuous"}
    assert rows["cli-job"][:4] == ["cli-job", "IN_PROGRESS", "SNAPSHOT", "0"]
    counts = dict(kv.split("=") for kv in rows["cli-job"][4:])
    assert counts == {"QUEUED": "1", "IN_PROGRESS": "1", "SUCCEEDED": "1", "FAILED": "0",
                      "TIMED_OUT": "0", "REJECTED": "0", "REMOVED": "0", "CANCELED": "0"}
    assert rows["cli-continuous"][:3] == ["cli-continuous", "IN_PROGRESS", "CONTINUOUS"]

    shown = cli("show", job_id)
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
              for line in shown if ":" in line and not line.startswith(("THING", "cli-"))}
    assert fields["job"] == "cli-job" and fields["status"] == "IN_PROGRESS"
    assert fields["selection"] == "SNAPSHOT" and fields["description"] == "reboot the fleet"
    assert fields["targets"] == ", ".join([a_arn, b_arn, c_arn])
    assert json.loads(fields["document"]) == {"operation": "reboot"}
    executions = {line.split()[0]: line.split()[1:] for line in shown if line.startswith("cli-")}
    assert executions == {"cli-a": ["1", "SUCCEEDED", "2"], "cli-b": ["1", "IN_PROGRESS", "2"],
                          "cli-c": ["1", "QUEUED", "1"]}
    # The view agrees with the control plane.
    details = process(iot, job_id)
    assert (details["numberOfQueuedThings"], details["numberOfInProgressThings"],
            details["numberOfSucceededThings"]) == (1, 1, 1)
    # An unknown job is an error on stderr, not an empty view.
    missing = subprocess.run([mooring_binary(), "jobs", "show", "nope", "--data-dir", str(mooring.data_dir)],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "no job nope" in missing.stderr
    dev_a.stop()
    dev_b.stop()


def test_continuous_job_reaches_things_added_later(mooring):
    iot = mooring.client("iot")
    a, _ = new_thing(iot)
    b, _ = new_thing(iot)
    parent = iot.create_thing_group(thingGroupName=f"g-{uuid.uuid4().hex[:6]}")
    child = iot.create_thing_group(thingGroupName=f"c-{uuid.uuid4().hex[:6]}",
                                   parentGroupName=parent["thingGroupName"])
    iot.add_thing_to_thing_group(thingGroupName=parent["thingGroupName"], thingName=a)
    job_id = create_job(iot, [parent["thingGroupArn"]], targetSelection="CONTINUOUS")
    assert execution(iot, a, job_id)["status"] == "QUEUED"
    dev_b = Device(mooring, b)
    iot.add_thing_to_thing_group(thingGroupArn=child["thingGroupArn"], thingName=b)
    nxt = dev_b.message(dev_b.topic("notify-next"))
    assert nxt["execution"]["jobId"] == job_id
    iot.remove_thing_from_thing_group(thingGroupName=parent["thingGroupName"], thingName=a)
    wait_until(lambda: execution(iot, a, job_id)["status"] == "REMOVED", 5)
    assert dev_b.request(f"{job_id}/update", {"status": "SUCCEEDED"})[0] == "accepted"
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["status"] == "IN_PROGRESS" and job["targetSelection"] == "CONTINUOUS"
    assert job["jobProcessDetails"]["numberOfRemovedThings"] == 1
    # Re-adding gives a new execution.
    iot.add_thing_to_thing_group(thingGroupName=parent["thingGroupName"], thingName=a)
    wait_until(lambda: execution(iot, a, job_id)["executionNumber"] == 2, 5)
    dev_b.stop()


def test_snapshot_group_targets_cancel_and_delete(mooring):
    iot = mooring.client("iot")
    group = iot.create_thing_group(thingGroupName=f"g-{uuid.uuid4().hex[:6]}")
    sub = iot.create_thing_group(thingGroupName=f"s-{uuid.uuid4().hex[:6]}",
                                 parentGroupName=group["thingGroupName"])
    t1, _ = new_thing(iot)
    t2, _ = new_thing(iot)
    iot.add_thing_to_thing_group(thingGroupName=group["thingGroupName"], thingName=t1)
    iot.add_thing_to_thing_group(thingGroupName=sub["thingGroupName"], thingName=t2)
    assert sorted(iot.list_things_in_thing_group(thingGroupName=group["thingGroupName"],
                                                 recursive=True)["things"]) == sorted([t1, t2])
    assert iot.list_things_in_thing_group(thingGroupName=group["thingGroupName"])["things"] == [t1]
    job_id = create_job(iot, [group["thingGroupArn"]])
    assert process(iot, job_id)["numberOfQueuedThings"] == 2
    dev = Device(mooring, t1, subscribe=False)
    assert dev.request("start-next", {})[0] == "accepted"

    with pytest.raises(botocore.exceptions.ClientError) as err:
        iot.delete_job(jobId=job_id)
    assert err.value.response["Error"]["Code"] == "InvalidStateTransitionException"
    with pytest.raises(botocore.exceptions.ClientError) as err:
        iot.cancel_job_execution(thingName=t1, jobId=job_id)
    assert err.value.response["Error"]["Code"] == "InvalidStateTransitionException"

    out = iot.cancel_job(jobId=job_id, reasonCode="R1", comment="stop")
    assert (out["jobId"], out["jobArn"]) == (job_id, iot.describe_job(jobId=job_id)["job"]["jobArn"])
    job = iot.describe_job(jobId=job_id)["job"]
    assert (job["status"], job["reasonCode"], job["comment"]) == ("CANCELED", "R1", "stop")
    assert execution(iot, t1, job_id)["status"] == "IN_PROGRESS"
    assert execution(iot, t2, job_id)["status"] == "CANCELED"
    iot.cancel_job(jobId=job_id, force=True)
    e = execution(iot, t1, job_id)
    assert (e["status"], e["forceCanceled"]) == ("CANCELED", True)
    assert iot.describe_job(jobId=job_id)["job"]["forceCanceled"] is True

    iot.delete_job_execution(thingName=t2, jobId=job_id, executionNumber=1)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        execution(iot, t2, job_id)
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    iot.delete_job(jobId=job_id)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        iot.describe_job(jobId=job_id)
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    dev.stop()


def test_job_and_execution_events(mooring):
    iot = mooring.client("iot")
    iot.update_event_configurations(eventConfigurations={
        "JOB": {"Enabled": True}, "JOB_EXECUTION": {"Enabled": True}})
    configs = iot.describe_event_configurations()["eventConfigurations"]
    assert configs["JOB"] == {"Enabled": True} and configs["THING"] == {"Enabled": False}
    obs = Client(mooring, client_id="events-observer")
    obs.sub("$aws/events/#", 1)
    thing, arn = new_thing(iot)
    dev = Device(mooring, thing, subscribe=False)
    job_id = create_job(iot, [arn], description="evented")
    assert dev.request(f"{job_id}/update", {"status": "SUCCEEDED",
                                            "statusDetails": {"k": "v"}})[0] == "accepted"
    e = json.loads(obs.expect(f"$aws/events/jobExecution/{job_id}/succeeded").payload)
    assert set(e) == {"eventType", "eventId", "timestamp", "operation", "jobId", "thingArn",
                      "status", "statusDetails"}
    assert (e["eventType"], e["operation"], e["status"]) == ("JOB_EXECUTION", "succeeded",
                                                             "SUCCEEDED")
    assert e["thingArn"] == arn and e["statusDetails"] == {"k": "v"}
    j = json.loads(obs.expect(f"$aws/events/job/{job_id}/completed").payload)
    assert (j["eventType"], j["status"], j["targetSelection"]) == ("JOB", "COMPLETED", "SNAPSHOT")
    assert j["targets"] == [arn] and j["description"] == "evented"
    assert j["jobProcessDetails"]["numberOfSucceededThings"] == 1
    assert len(str(j["createdAt"])) == 13 and len(str(j["timestamp"])) == 10

    other = create_job(iot, [arn])
    iot.cancel_job(jobId=other, comment="bye")
    assert json.loads(obs.expect(f"$aws/events/job/{other}/cancellation_in_progress").payload)[
        "comment"] == "bye"
    assert json.loads(obs.expect(f"$aws/events/jobExecution/{other}/canceled").payload)[
        "status"] == "CANCELED"
    assert json.loads(obs.expect(f"$aws/events/job/{other}/canceled").payload)["status"] == \
        "CANCELED"
    iot.delete_job(jobId=other)
    obs.expect(f"$aws/events/job/{other}/deletion_in_progress")
    obs.expect(f"$aws/events/job/{other}/deleted")
    dev.stop()


def test_sigkill_in_the_middle_of_a_rollout(mooring_factory):
    m = mooring_factory(extra_args=short_minute(1000))
    iot = m.client("iot")
    things = [new_thing(iot) for _ in range(6)]
    job_id = create_job(iot, [a for _, a in things],
                        jobExecutionsRolloutConfig={"maximumPerMinute": 2},
                        timeoutConfig={"inProgressTimeoutInMinutes": 3})
    first = iot.list_job_executions_for_job(jobId=job_id)["executionSummaries"]
    assert len(first) == 2
    started_thing = first[0]["thingArn"].rsplit("/", 1)[1]
    dev = Device(m, started_thing, subscribe=False)
    kind, r = dev.request("start-next", {"statusDetails": {"phase": "a"}})
    assert r["execution"]["versionNumber"] == 2
    dev.stop()
    m.kill()
    m.start()
    iot = m.client("iot")
    e = execution(iot, started_thing, job_id)
    assert (e["status"], e["versionNumber"], e["statusDetails"]) == (
        "IN_PROGRESS", 2, {"detailsMap": {"phase": "a"}})
    # The rollout continues where it stopped and the in-progress timer still fires.
    wait_until(lambda: len(iot.list_job_executions_for_job(jobId=job_id)
                           ["executionSummaries"]) == 6, 10, what="rollout after restart")
    wait_until(lambda: execution(iot, started_thing, job_id)["status"] == "TIMED_OUT", 10,
               what="timer after restart")
    dev = Device(m, started_thing, subscribe=False)
    assert dev.request(f"{job_id}/update", {"status": "SUCCEEDED"})[1]["code"] == \
        "InvalidStateTransition"
    dev.stop()


# ------------------------------------------------------------------------- HTTP device API

def test_iot_jobs_data_http_api(mooring):
    iot = mooring.client("iot")
    data = mooring.client("iot-jobs-data")
    thing, arn = new_thing(iot)
    document = {"op": "http"}
    job_id = create_job(iot, [arn], document)
    pending = data.get_pending_job_executions(thingName=thing)
    assert [j["jobId"] for j in pending["queuedJobs"]] == [job_id]
    assert pending["inProgressJobs"] == []
    assert set(pending["queuedJobs"][0]) == SUMMARY_KEYS
    started = data.start_next_pending_job_execution(thingName=thing, statusDetails={"a": "b"},
                                                    stepTimeoutInMinutes=10)["execution"]
    assert started["status"] == "IN_PROGRESS"
    assert json.loads(started["jobDocument"]) == document, "a string over HTTP"
    assert 0 < started["approximateSecondsBeforeTimedOut"] <= 600
    assert is_seconds(started["queuedAt"])
    described = data.describe_job_execution(thingName=thing, jobId=job_id,
                                            includeJobDocument=False)["execution"]
    assert "jobDocument" not in described and described["versionNumber"] == 2
    with pytest.raises(botocore.exceptions.ClientError) as err:
        data.update_job_execution(thingName=thing, jobId=job_id, status="SUCCEEDED",
                                  expectedVersion=7)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    out = data.update_job_execution(thingName=thing, jobId=job_id, status="SUCCEEDED",
                                    includeJobExecutionState=True, includeJobDocument=True)
    assert out["executionState"]["status"] == "SUCCEEDED"
    assert json.loads(out["jobDocument"]) == document
    with pytest.raises(data.exceptions.InvalidStateTransitionException):
        data.update_job_execution(thingName=thing, jobId=job_id, status="FAILED")
    with pytest.raises(data.exceptions.TerminalStateException):
        data.describe_job_execution(thingName=thing, jobId=job_id)
    with pytest.raises(data.exceptions.ResourceNotFoundException):
        data.describe_job_execution(thingName=thing, jobId="nope")
    with pytest.raises(data.exceptions.InvalidRequestException):
        data.update_job_execution(thingName=thing, jobId=job_id, status="BOGUS")
    assert "execution" not in data.start_next_pending_job_execution(thingName=thing)


# -------------------------------------------------------------- control plane vs moto's server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_iot():
    import boto3
    import botocore.config
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30, 0.1,
                   "moto_server")
        yield boto3.client("iot", endpoint_url=f"http://127.0.0.1:{port}",
                           region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing",
                           config=botocore.config.Config(retries={"max_attempts": 1}))
    finally:
        proc.terminate()
        proc.wait(10)


def key_paths(value, prefix=""):
    """Every key path in a response (list items merged under `[]`)."""
    out = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "ResponseMetadata":
                continue
            out.add(prefix + k)
            out |= key_paths(v, prefix + k + ".")
    elif isinstance(value, list):
        for item in value:
            out |= key_paths(item, prefix + "[].")
    return out


def control_plane_script(iot):
    """The same calls against either server; returns {operation: response}."""
    out = {}
    suffix = uuid.uuid4().hex[:6]
    thing = iot.create_thing(thingName=f"cmp-{suffix}")
    group = iot.create_thing_group(thingGroupName=f"cmpg-{suffix}",
                                   thingGroupProperties={"thingGroupDescription": "d"})
    out["CreateThingGroup"] = group
    iot.add_thing_to_thing_group(thingGroupName=group["thingGroupName"],
                                 thingName=thing["thingName"])
    out["DescribeThingGroup"] = iot.describe_thing_group(thingGroupName=group["thingGroupName"])
    out["ListThingGroups"] = iot.list_thing_groups()
    out["ListThingsInThingGroup"] = iot.list_things_in_thing_group(
        thingGroupName=group["thingGroupName"])
    job_id = f"cmp-job-{suffix}"
    out["CreateJob"] = iot.create_job(
        jobId=job_id, targets=[thing["thingArn"]], document='{"a":1}', description="cmp",
        jobExecutionsRolloutConfig={"maximumPerMinute": 10},
        timeoutConfig={"inProgressTimeoutInMinutes": 10})
    out["DescribeJob"] = iot.describe_job(jobId=job_id)
    out["ListJobs"] = iot.list_jobs()
    out["GetJobDocument"] = iot.get_job_document(jobId=job_id)
    out["DescribeJobExecution"] = iot.describe_job_execution(thingName=thing["thingName"],
                                                             jobId=job_id)
    out["ListJobExecutionsForJob"] = iot.list_job_executions_for_job(jobId=job_id)
    out["ListJobExecutionsForThing"] = iot.list_job_executions_for_thing(
        thingName=thing["thingName"])
    out["CancelJob"] = iot.cancel_job(jobId=job_id, comment="c")
    out["DescribeJob(canceled)"] = iot.describe_job(jobId=job_id)
    out["DeleteJob"] = iot.delete_job(jobId=job_id, force=True)
    return out


# Key paths moto returns that Mooring does not, with the reason.
MOTO_ONLY = {
    # moto sets startedAt when the execution is queued; AWS sets it on the first IN_PROGRESS,
    # so a QUEUED execution has none.
    "DescribeJobExecution": {"execution.startedAt"},
    "ListJobExecutionsForJob": {"executionSummaries.[].jobExecutionSummary.startedAt"},
    "ListJobExecutionsForThing": {"executionSummaries.[].jobExecutionSummary.startedAt"},
}
# Key paths Mooring returns that moto does not (moto's gaps).
MOORING_ONLY_EXPECTED = {
    "DescribeJob": {"job.jobProcessDetails.numberOfTimedOutThings"},
}


def test_control_plane_shapes_match_moto(mooring, moto_iot):
    ours = control_plane_script(mooring.client("iot"))
    theirs = control_plane_script(moto_iot)
    report = {}
    for op in ours:
        a, b = key_paths(ours[op]), key_paths(theirs[op])
        if a != b:
            report[op] = {"mooring_only": sorted(a - b), "moto_only": sorted(b - a)}
    print(json.dumps(report, indent=1))
    (Path(os.environ.get("JOBS_MOTO_REPORT", "/tmp")) / "jobs_moto_diff.json").write_text(
        json.dumps(report, indent=1))
    for op, diff in report.items():
        unexpected = [k for k in diff["moto_only"] if k not in MOTO_ONLY.get(op, set())]
        assert not unexpected, f"{op}: moto returns {unexpected} that Mooring lacks"
