"""Topic rules fed by the live MQTT broker: a rule created with boto3 sees device publishes,
Basic Ingest publishes and lifecycle events, and its republish action reaches paho
subscribers. This is the seed's scenario: `SELECT * FROM '$aws/events/#'` tracking who is
connected and subscribed."""

import json
import uuid

from test_mqtt import Client


def republish_rule(sql, topic, qos=1):
    return {
        "sql": sql,
        "awsIotSqlVersion": "2016-03-23",
        "ruleDisabled": False,
        "actions": [{"republish": {"roleArn": "arn:aws:iam::000000000000:role/r", "topic": topic, "qos": qos}}],
    }


def test_republish_rule_with_where_select_and_topic_template(mooring):
    iot = mooring.client("iot")
    iot.create_topic_rule(
        ruleName="hot_sensors",
        topicRulePayload=republish_rule(
            "SELECT temp, topic(2) AS device, clientid() AS client FROM 'sensors/+' WHERE temp > 30",
            "alerts/${topic(2)}",
        ),
    )
    watcher = Client(mooring)
    watcher.sub("alerts/#", 1)
    device = Client(mooring, client_id="thermo-1")
    device.pub("sensors/kitchen", json.dumps({"temp": 21}).encode(), 1)
    device.pub("sensors/oven", json.dumps({"temp": 240, "extra": True}).encode(), 1)
    msg = watcher.expect("alerts/oven")
    assert json.loads(msg.payload) == {"temp": 240, "device": "oven", "client": "thermo-1"}
    watcher.nothing()
    device.stop()
    watcher.stop()


def test_basic_ingest_reaches_only_the_named_rule(mooring):
    iot = mooring.client("iot")
    iot.create_topic_rule(
        ruleName="ingest",
        topicRulePayload=republish_rule("SELECT *, topic() AS t FROM 'factory/+/line'", "ingested/out"),
    )
    watcher = Client(mooring)
    watcher.sub("ingested/out", 1)
    watcher.sub("factory/#", 1)
    device = Client(mooring)
    device.pub("$aws/rules/ingest/factory/7/line", b'{"count": 3}', 1)
    msg = watcher.expect("ingested/out")
    assert json.loads(msg.payload) == {"count": 3, "t": "factory/7/line"}
    watcher.nothing()  # Basic Ingest publishes reach no subscriber
    device.stop()
    watcher.stop()


def test_seed_lifecycle_rule_tracks_connections_and_subscriptions(mooring):
    iot = mooring.client("iot")
    iot.create_topic_rule(
        ruleName="presence",
        topicRulePayload=republish_rule(
            "SELECT eventType, clientId, topic(4) AS kind FROM '$aws/events/#'", "app/presence"
        ),
    )
    watcher = Client(mooring, client_id="app-server")
    watcher.sub("app/presence", 1)
    user = f"user-{uuid.uuid4().hex[:6]}"
    device = Client(mooring, client_id=user)
    device.sub("chat/room-1", 1)
    seen = []
    while len(seen) < 2:
        event = json.loads(watcher.expect("app/presence").payload)
        if event["clientId"] == user:
            seen.append(event)
    assert seen[0] == {"eventType": "connected", "clientId": user, "kind": "connected"}
    assert seen[1] == {"eventType": "subscribed", "clientId": user, "kind": "subscribed"}
    device.stop()
    while True:
        event = json.loads(watcher.expect("app/presence").payload)
        if event["clientId"] == user and event["eventType"] == "disconnected":
            break
    watcher.stop()
