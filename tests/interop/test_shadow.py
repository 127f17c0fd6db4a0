"""Device Shadow interop: boto3 `iot-data` (GetThingShadow, UpdateThingShadow,
DeleteThingShadow, ListNamedShadowsForThing) with exact response bodies and errors, the
official awsiotsdk `iotshadow` client over mTLS (update, get, delta and documents events),
raw paho clients on the shadow topics (every response shape, rejected codes, named shadows,
responses seen by other subscribers as ordinary publishes), rules using `get_thing_shadow`
and rules on `/update/accepted`, and a SIGKILL right after an MQTT update was accepted.
"""

import json
import time
import uuid

import botocore.exceptions
import pytest

from test_mqtt import Client, issue_client_certificate
from sdk_events import SdkEvents

ROLE = "arn:aws:iam::000000000000:role/shadow-rules"


def new_thing():
    return f"shadow-{uuid.uuid4().hex[:8]}"


def body(response):
    return json.loads(response["payload"].read())


def assert_now(ts):
    assert isinstance(ts, int) and abs(ts - time.time()) < 10, ts


def error(excinfo):
    err = excinfo.value.response
    return err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"], err["Error"]["Message"]


# -------------------------------------------------------------------------------- iot-data HTTP

def test_update_get_delete_classic_shadow_exact_bodies(mooring):
    data = mooring.client("iot-data")
    thing = new_thing()
    update = {"state": {"desired": {"color": "red", "cfg": {"a": 1}, "list": [1, {"x": 2}]},
                        "reported": {"color": "blue"}}, "clientToken": "tok-1"}
    accepted = body(data.update_thing_shadow(thingName=thing, payload=json.dumps(update)))
    t = accepted["timestamp"]
    assert_now(t)
    assert accepted == {
        "state": update["state"],
        "metadata": {"desired": {"color": {"timestamp": t}, "cfg": {"a": {"timestamp": t}},
                                 "list": [{"timestamp": t}, {"x": {"timestamp": t}}]},
                     "reported": {"color": {"timestamp": t}}},
        "version": 1, "timestamp": t, "clientToken": "tok-1"}

    doc = body(data.get_thing_shadow(thingName=thing))
    assert_now(doc["timestamp"])
    assert doc == {
        "state": {"desired": update["state"]["desired"], "reported": {"color": "blue"},
                  "delta": {"color": "red", "cfg": {"a": 1}, "list": [1, {"x": 2}]}},
        "metadata": accepted["metadata"], "version": 1, "timestamp": doc["timestamp"]}

    # null deletes keys; the reported side catching up shrinks the delta.
    second = body(data.update_thing_shadow(thingName=thing, payload=json.dumps(
        {"state": {"desired": {"list": None}, "reported": {"color": "red", "cfg": {"a": 1}}}})))
    assert second["version"] == 2
    assert second["state"] == {"desired": {"list": None},
                               "reported": {"color": "red", "cfg": {"a": 1}}}
    assert second["metadata"]["desired"] == {"list": {"timestamp": second["timestamp"]}}
    doc = body(data.get_thing_shadow(thingName=thing))
    assert doc["state"] == {"desired": {"color": "red", "cfg": {"a": 1}},
                            "reported": {"color": "red", "cfg": {"a": 1}}}
    assert "delta" not in doc["state"]
    assert doc["version"] == 2

    deleted = body(data.delete_thing_shadow(thingName=thing))
    assert deleted == {"version": 2, "timestamp": deleted["timestamp"]}
    assert_now(deleted["timestamp"])
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.get_thing_shadow(thingName=thing)
    assert error(e) == (404, "ResourceNotFoundException", f"No shadow exists with name: '{thing}'")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.delete_thing_shadow(thingName=thing)
    assert error(e)[:2] == (404, "ResourceNotFoundException")
    # Re-created: the version continues.
    again = body(data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"on":true}}}'))
    assert again["version"] == 3
    assert body(data.get_thing_shadow(thingName=thing))["state"] == {"reported": {"on": True}}


def test_named_shadows_are_separate_and_listed_in_pages(mooring):
    data = mooring.client("iot-data")
    thing = new_thing()
    names = [f"s{i:02d}" for i in range(5)]
    for n in names:
        data.update_thing_shadow(thingName=thing, shadowName=n,
                                 payload=json.dumps({"state": {"reported": {"name": n}}}))
    data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"classic":1}}}')
    assert body(data.get_thing_shadow(thingName=thing, shadowName="s03"))["state"] == {
        "reported": {"name": "s03"}}
    assert body(data.get_thing_shadow(thingName=thing))["state"] == {"reported": {"classic": 1}}
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.get_thing_shadow(thingName=thing, shadowName="nope")
    assert error(e) == (404, "ResourceNotFoundException",
                        f"No shadow exists with name: '{thing}~nope'")

    first = data.list_named_shadows_for_thing(thingName=thing, pageSize=2)
    assert first["results"] == ["s00", "s01"] and "nextToken" in first
    assert_now(first["timestamp"] if isinstance(first["timestamp"], int)
               else int(first["timestamp"].timestamp()))
    seen = list(first["results"])
    token = first["nextToken"]
    while token:
        page = data.list_named_shadows_for_thing(thingName=thing, pageSize=2, nextToken=token)
        seen += page["results"]
        token = page.get("nextToken")
    assert seen == names
    data.delete_thing_shadow(thingName=thing, shadowName="s01")
    assert data.list_named_shadows_for_thing(thingName=thing)["results"] == [
        "s00", "s02", "s03", "s04"]
    assert data.list_named_shadows_for_thing(thingName=new_thing())["results"] == []
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.list_named_shadows_for_thing(thingName=thing, pageSize=101)
    assert error(e)[:2] == (400, "InvalidRequestException")


def test_http_errors_conflict_size_and_bad_documents(mooring):
    data = mooring.client("iot-data")
    thing = new_thing()
    data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"a":1}}}')
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"a":2}},"version":7}')
    assert error(e) == (409, "ConflictException", "Version conflict")
    ok = body(data.update_thing_shadow(thingName=thing,
                                       payload=b'{"state":{"reported":{"a":2}},"version":1}'))
    assert ok["version"] == 2

    big = json.dumps({"state": {"reported": {"blob": "x" * 9000}}})
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.update_thing_shadow(thingName=thing, payload=big)
    assert error(e) == (413, "RequestEntityTooLargeException",
                        "The payload exceeds the maximum size allowed")

    for payload, message in [
        (b"{nope", "Invalid JSON"),
        (b'{"clientToken":"x"}', "Missing required node: state"),
        (b'{"state":[]}', "State node must be an object"),
        (b'{"state":{"desired":3}}', "Desired node must be an object"),
        (b'{"state":{"delta":{"a":1}}}', "State contains an invalid node"),
        (b'{"state":{},"version":"x"}', "Invalid version"),
        (json.dumps({"state": {}, "clientToken": "t" * 65}).encode(), "Invalid clientToken"),
        (json.dumps({"state": {"desired": {"1": {"2": {"3": {"4": {"5": {"6": {"7": 1}}}}}}}}}).encode(),
         "JSON contains too many levels of nesting; maximum is 6"),
    ]:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            data.update_thing_shadow(thingName=thing, payload=payload)
        assert error(e) == (400, "InvalidRequestException", message), payload
    # Nothing stored was damaged.
    doc = body(data.get_thing_shadow(thingName=thing))
    assert doc["state"] == {"reported": {"a": 2}} and doc["version"] == 2


def test_http_error_body_carries_code_message_timestamp(mooring):
    data = mooring.client("iot-data")
    raw = []
    data.meta.events.register(
        "response-received.iot-data.*",
        lambda response_dict=None, **kw: raw.append(response_dict))
    thing = new_thing()
    with pytest.raises(botocore.exceptions.ClientError):
        data.get_thing_shadow(thingName=thing, shadowName="gone")
    sent = json.loads(raw[-1]["body"])
    assert_now(sent["timestamp"])
    assert sent == {"code": 404, "message": f"No shadow exists with name: '{thing}~gone'",
                    "timestamp": sent["timestamp"]}
    assert raw[-1]["headers"]["x-amzn-ErrorType"] == "ResourceNotFoundException"


# ------------------------------------------------------------------------------- paho, raw topics

def watch(m, thing, prefix=None):
    c = Client(m)
    c.sub(f"{prefix or f'$aws/things/{thing}/shadow'}/#", 1)
    return c


def payload_of(client, topic, timeout=5):
    return json.loads(client.expect(topic, timeout).payload)


def test_raw_topics_accepted_delta_documents_and_rejected(mooring):
    thing = new_thing()
    prefix = f"$aws/things/{thing}/shadow"
    device = watch(mooring, thing)
    other = watch(mooring, thing)  # responses are ordinary publishes: any subscriber sees them

    device.pub(f"{prefix}/update", json.dumps(
        {"state": {"desired": {"temp": 20}}, "clientToken": "c1"}), 1)
    accepted = payload_of(device, f"{prefix}/update/accepted")
    t = accepted["timestamp"]
    assert_now(t)
    assert accepted == {"state": {"desired": {"temp": 20}},
                        "metadata": {"desired": {"temp": {"timestamp": t}}},
                        "version": 1, "timestamp": t, "clientToken": "c1"}
    assert payload_of(device, f"{prefix}/update/delta") == {
        "state": {"temp": 20}, "metadata": {"temp": {"timestamp": t}},
        "version": 1, "timestamp": t, "clientToken": "c1"}
    assert payload_of(device, f"{prefix}/update/documents") == {
        "current": {"state": {"desired": {"temp": 20}},
                    "metadata": {"desired": {"temp": {"timestamp": t}}}, "version": 1},
        "timestamp": t, "clientToken": "c1"}
    assert payload_of(other, f"{prefix}/update/accepted") == accepted

    device.pub(f"{prefix}/update", json.dumps({"state": {"reported": {"temp": 20}}}), 1)
    accepted2 = payload_of(device, f"{prefix}/update/accepted")
    t2 = accepted2["timestamp"]
    documents = payload_of(device, f"{prefix}/update/documents")
    assert documents == {
        "previous": {"state": {"desired": {"temp": 20}},
                     "metadata": {"desired": {"temp": {"timestamp": t}}}, "version": 1},
        "current": {"state": {"desired": {"temp": 20}, "reported": {"temp": 20}},
                    "metadata": {"desired": {"temp": {"timestamp": t}},
                                 "reported": {"temp": {"timestamp": t2}}}, "version": 2},
        "timestamp": t2}
    device.nothing()  # no delta: desired and reported agree

    device.pub(f"{prefix}/get", json.dumps({"clientToken": "g1"}), 1)
    got = payload_of(device, f"{prefix}/get/accepted")
    assert got["state"] == {"desired": {"temp": 20}, "reported": {"temp": 20}}
    assert got["version"] == 2 and got["clientToken"] == "g1"

    # rejected shapes: conflict, bad JSON, and a missing shadow.
    device.pub(f"{prefix}/update", json.dumps(
        {"state": {"reported": {"temp": 1}}, "version": 1, "clientToken": "c2"}), 1)
    rejected = payload_of(device, f"{prefix}/update/rejected")
    assert_now(rejected["timestamp"])
    assert rejected == {"code": 409, "message": "Version conflict",
                        "timestamp": rejected["timestamp"], "clientToken": "c2"}
    device.pub(f"{prefix}/update", b"{broken", 1)
    rejected = payload_of(device, f"{prefix}/update/rejected")
    assert rejected == {"code": 400, "message": "Invalid JSON", "timestamp": rejected["timestamp"]}

    device.pub(f"{prefix}/delete", json.dumps({"clientToken": "d1"}), 1)
    deleted = payload_of(device, f"{prefix}/delete/accepted")
    assert deleted == {"version": 2, "timestamp": deleted["timestamp"], "clientToken": "d1"}
    device.pub(f"{prefix}/get", b"", 1)
    rejected = payload_of(device, f"{prefix}/get/rejected")
    assert rejected == {"code": 404, "message": f"No shadow exists with name: '{thing}'",
                        "timestamp": rejected["timestamp"]}
    device.pub(f"{prefix}/delete", json.dumps({"clientToken": "d2"}), 1)
    rejected = payload_of(device, f"{prefix}/delete/rejected")
    assert rejected["code"] == 404 and rejected["clientToken"] == "d2"


def test_named_shadow_topics_and_http_updates_publish(mooring):
    thing = new_thing()
    prefix = f"$aws/things/{thing}/shadow/name/config"
    device = watch(mooring, thing, prefix)
    device.pub(f"{prefix}/update", json.dumps({"state": {"reported": {"mode": "eco"}}}), 1)
    assert payload_of(device, f"{prefix}/update/accepted")["version"] == 1
    data = mooring.client("iot-data")
    assert body(data.get_thing_shadow(thingName=thing, shadowName="config"))["state"] == {
        "reported": {"mode": "eco"}}
    with pytest.raises(botocore.exceptions.ClientError):
        data.get_thing_shadow(thingName=thing)  # the classic shadow is separate
    # An HTTP update publishes accepted, delta and documents on the named topics.
    data.update_thing_shadow(thingName=thing, shadowName="config",
                             payload=b'{"state":{"desired":{"mode":"turbo"}},"clientToken":"h"}')
    accepted = payload_of(device, f"{prefix}/update/accepted")
    assert accepted["version"] == 2 and accepted["clientToken"] == "h"
    delta = payload_of(device, f"{prefix}/update/delta")
    assert delta["state"] == {"mode": "turbo"} and delta["version"] == 2
    documents = payload_of(device, f"{prefix}/update/documents")
    assert documents["previous"]["version"] == 1 and documents["current"]["version"] == 2
    data.delete_thing_shadow(thingName=thing, shadowName="config")
    assert payload_of(device, f"{prefix}/delete/accepted")["version"] == 2


# ----------------------------------------------------------------------------- awsiotsdk iotshadow

def test_awsiotsdk_shadow_client(mooring, tmp_path):
    from awscrt import mqtt as crt_mqtt
    from awsiot import iotshadow, mqtt_connection_builder

    thing = new_thing()
    cert_path, key_path, _ = issue_client_certificate(mooring, tmp_path)
    port = int(mooring.endpoints["mqtts"].rsplit(":", 1)[1])
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=port, cert_filepath=str(cert_path),
        pri_key_filepath=str(key_path), ca_filepath=str(mooring.data_dir / "ca" / "ca.pem"),
        client_id=thing, clean_session=True, keep_alive_secs=30)
    connection.connect().result(10)
    shadow = iotshadow.IotShadowClient(connection)
    events = SdkEvents()
    on, expect = events.on, events.expect

    qos = crt_mqtt.QoS.AT_LEAST_ONCE
    try:
        for future, _ in [
            shadow.subscribe_to_update_shadow_accepted(
                iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), qos, on("update_accepted")),
            shadow.subscribe_to_update_shadow_rejected(
                iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing), qos, on("update_rejected")),
            shadow.subscribe_to_shadow_delta_updated_events(
                iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing), qos, on("delta")),
            shadow.subscribe_to_shadow_updated_events(
                iotshadow.ShadowUpdatedSubscriptionRequest(thing_name=thing), qos, on("updated")),
            shadow.subscribe_to_get_shadow_accepted(
                iotshadow.GetShadowSubscriptionRequest(thing_name=thing), qos, on("get_accepted")),
            shadow.subscribe_to_get_shadow_rejected(
                iotshadow.GetShadowSubscriptionRequest(thing_name=thing), qos, on("get_rejected")),
        ]:
            future.result(10)

        shadow.publish_get_shadow(
            iotshadow.GetShadowRequest(thing_name=thing, client_token="g0"), qos).result(10)
        missing = expect("get_rejected")
        assert missing.code == 404 and missing.client_token == "g0"

        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=thing, client_token="u1",
            state=iotshadow.ShadowState(desired={"color": "green", "brightness": 80})), qos).result(10)
        accepted = expect("update_accepted")
        assert accepted.version == 1 and accepted.client_token == "u1"
        assert accepted.state.desired == {"color": "green", "brightness": 80}
        delta = expect("delta")
        assert delta.state == {"color": "green", "brightness": 80} and delta.version == 1
        updated = expect("updated")
        assert updated.previous is None
        assert updated.current.version == 1
        assert updated.current.state.desired == {"color": "green", "brightness": 80}

        # The device reports what it applied.
        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=thing, client_token="u2",
            state=iotshadow.ShadowState(reported={"color": "green", "brightness": 80})), qos).result(10)
        assert expect("update_accepted").version == 2
        updated = expect("updated")
        assert updated.previous.version == 1 and updated.current.version == 2
        assert updated.current.state.reported == {"color": "green", "brightness": 80}

        shadow.publish_get_shadow(
            iotshadow.GetShadowRequest(thing_name=thing, client_token="g1"), qos).result(10)
        got = expect("get_accepted")
        assert got.version == 2 and got.client_token == "g1"
        assert got.state.desired == got.state.reported == {"color": "green", "brightness": 80}
        assert got.state.delta is None

        shadow.publish_update_shadow(iotshadow.UpdateShadowRequest(
            thing_name=thing, client_token="u3", version=1,
            state=iotshadow.ShadowState(reported={"color": "red"})), qos).result(10)
        rejected = expect("update_rejected")
        assert (rejected.code, rejected.message, rejected.client_token) == (
            409, "Version conflict", "u3")
    finally:
        connection.disconnect().result(10)


# ----------------------------------------------------------------------------------------- rules

def test_rules_read_shadows_and_fire_on_accepted(mooring):
    iot = mooring.client("iot")
    thing = new_thing()
    iot.create_topic_rule(ruleName=f"ask_{uuid.uuid4().hex[:6]}", topicRulePayload={
        "sql": f"SELECT get_thing_shadow(topic(2), '{ROLE}').state.reported AS reported, "
               f"get_thing_shadow(topic(2), 'cfg', '{ROLE}').version AS cfg_version "
               "FROM 'ask/+'",
        "actions": [{"republish": {"roleArn": ROLE, "topic": "answer/${topic(2)}", "qos": 1}}]})
    iot.create_topic_rule(ruleName=f"seen_{uuid.uuid4().hex[:6]}", topicRulePayload={
        "sql": "SELECT state.reported.temp AS temp, version, topic(3) AS thing "
               "FROM '$aws/things/+/shadow/update/accepted' WHERE state.reported.temp > 30",
        "actions": [{"republish": {"roleArn": ROLE, "topic": "hot/${topic(3)}", "qos": 1}}]})
    listener = Client(mooring)
    listener.sub("answer/#", 1)
    listener.sub("hot/#", 1)

    data = mooring.client("iot-data")
    data.update_thing_shadow(thingName=thing, payload=b'{"state":{"reported":{"temp":21}}}')
    data.update_thing_shadow(thingName=thing, shadowName="cfg", payload=b'{"state":{"desired":{"x":1}}}')
    data.update_thing_shadow(thingName=thing, shadowName="cfg", payload=b'{"state":{"desired":{"x":2}}}')
    listener.pub(f"ask/{thing}", b"{}", 1)
    answer = json.loads(listener.expect(f"answer/{thing}").payload)
    assert answer == {"reported": {"temp": 21}, "cfg_version": 2}
    nobody = new_thing()
    listener.pub(f"ask/{nobody}", b"{}", 1)
    assert json.loads(listener.expect(f"answer/{nobody}").payload) == {}

    # The shadow service's own publish on /update/accepted triggers the rule (MQTT update).
    device = Client(mooring)
    device.pub(f"$aws/things/{thing}/shadow/update", b'{"state":{"reported":{"temp":35}}}', 1)
    hot = json.loads(listener.expect(f"hot/{thing}").payload)
    assert hot == {"temp": 35, "version": 2, "thing": thing}
    device.pub(f"$aws/things/{thing}/shadow/update", b'{"state":{"reported":{"temp":25}}}', 1)
    listener.nothing()


# ------------------------------------------------------------------------------------- durability

def test_accepted_update_survives_sigkill(mooring):
    thing = new_thing()
    prefix = f"$aws/things/{thing}/shadow"
    device = watch(mooring, thing)
    for i in range(1, 4):
        device.pub(f"{prefix}/update", json.dumps({"state": {"reported": {"n": i}}}), 1)
        assert payload_of(device, f"{prefix}/update/accepted")["version"] == i
    device.pub(f"{prefix}/update", json.dumps({"state": {"desired": {"n": 9}}}), 1)
    accepted = payload_of(device, f"{prefix}/update/accepted")
    assert accepted["version"] == 4
    mooring.kill()
    mooring.start()
    doc = body(mooring.client("iot-data").get_thing_shadow(thingName=thing))
    assert doc["version"] == 4
    assert doc["state"] == {"desired": {"n": 9}, "reported": {"n": 3}, "delta": {"n": 9}}
    assert doc["metadata"]["desired"] == {"n": {"timestamp": accepted["timestamp"]}}
