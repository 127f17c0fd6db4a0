"""Topic rules control plane (`aws iot` CreateTopicRule and friends) driven with boto3.

Checks exact response shapes, the errors AWS answers (SqlParseException for bad SQL,
UnauthorizedException for a missing rule, ResourceAlreadyExistsException, InvalidRequest
for unsupported actions), and that acknowledged rules survive a SIGKILL and restart.
Action delivery needs the broker, which is not wired yet; it is tested at the engine level
in Rust (crates/mooring-iot/tests/engine.rs).
"""

import datetime

import botocore.exceptions
import pytest

ROLE = "arn:aws:iam::000000000000:role/iot-rules"


def republish(topic="out/${topic(2)}", qos=0):
    return {"republish": {"roleArn": ROLE, "topic": topic, "qos": qos}}


def payload(sql, actions=None, **extra):
    body = {"sql": sql, "actions": actions if actions is not None else [republish()]}
    body.update(extra)
    return body


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def test_create_get_list_replace_enable_disable_delete(mooring):
    iot = mooring.client("iot")
    region = mooring.endpoints["region"]
    arn = f"arn:aws:iot:{region}:000000000000:rule/presence"

    resp = iot.create_topic_rule(
        ruleName="presence",
        topicRulePayload=payload(
            "SELECT * FROM '$aws/events/#'",
            description="lifecycle events",
            awsIotSqlVersion="2016-03-23",
            errorAction={"republish": {"roleArn": ROLE, "topic": "errors"}},
        ),
        tags="env=dev&team=iot",
    )
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200

    got = iot.get_topic_rule(ruleName="presence")
    assert got["ruleArn"] == arn
    rule = got["rule"]
    assert set(rule) == {
        "ruleName", "sql", "description", "createdAt", "actions", "ruleDisabled",
        "awsIotSqlVersion", "errorAction",
    }
    assert rule["ruleName"] == "presence"
    assert rule["sql"] == "SELECT * FROM '$aws/events/#'"
    assert rule["description"] == "lifecycle events"
    assert rule["actions"] == [{"republish": {"roleArn": ROLE, "topic": "out/${topic(2)}", "qos": 0}}]
    assert rule["errorAction"] == {"republish": {"roleArn": ROLE, "topic": "errors"}}
    assert rule["ruleDisabled"] is False
    assert rule["awsIotSqlVersion"] == "2016-03-23"
    assert isinstance(rule["createdAt"], datetime.datetime)
    age = datetime.datetime.now(datetime.timezone.utc) - rule["createdAt"]
    assert abs(age.total_seconds()) < 120

    iot.create_topic_rule(
        ruleName="temps",
        topicRulePayload=payload(
            "SELECT temp FROM 'sensors/+/data' WHERE temp > 50",
            awsIotSqlVersion="2015-10-08",
            ruleDisabled=True,
        ),
    )
    listed = iot.list_topic_rules()
    assert "nextToken" not in listed
    assert [r["ruleName"] for r in listed["rules"]] == ["presence", "temps"]
    first = listed["rules"][0]
    assert set(first) == {"ruleArn", "ruleName", "topicPattern", "createdAt", "ruleDisabled"}
    assert first["ruleArn"] == arn
    assert first["topicPattern"] == "$aws/events/#"
    assert first["ruleDisabled"] is False
    assert listed["rules"][1]["topicPattern"] == "sensors/+/data"
    assert listed["rules"][1]["ruleDisabled"] is True

    assert [r["ruleName"] for r in iot.list_topic_rules(ruleDisabled=True)["rules"]] == ["temps"]
    assert [r["ruleName"] for r in iot.list_topic_rules(topic="sensors/+/data")["rules"]] == ["temps"]

    page = iot.list_topic_rules(maxResults=1)
    assert [r["ruleName"] for r in page["rules"]] == ["presence"]
    page2 = iot.list_topic_rules(maxResults=1, nextToken=page["nextToken"])
    assert [r["ruleName"] for r in page2["rules"]] == ["temps"]
    assert "nextToken" not in page2

    iot.replace_topic_rule(
        ruleName="temps",
        topicRulePayload=payload(
            "SELECT VALUE temp FROM 'sensors/#'",
            actions=[{"lambda": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f"}}],
        ),
    )
    replaced = iot.get_topic_rule(ruleName="temps")["rule"]
    assert replaced["sql"] == "SELECT VALUE temp FROM 'sensors/#'"
    assert replaced["actions"] == [{"lambda": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:f"}}]
    assert replaced["ruleDisabled"] is False
    assert replaced["awsIotSqlVersion"] == "2016-03-23"
    assert "description" not in replaced

    iot.disable_topic_rule(ruleName="presence")
    assert iot.get_topic_rule(ruleName="presence")["rule"]["ruleDisabled"] is True
    iot.enable_topic_rule(ruleName="presence")
    assert iot.get_topic_rule(ruleName="presence")["rule"]["ruleDisabled"] is False

    iot.delete_topic_rule(ruleName="presence")
    with pytest.raises(botocore.exceptions.ClientError) as missing:
        iot.get_topic_rule(ruleName="presence")
    assert error_code(missing) == "UnauthorizedException"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 401
    assert [r["ruleName"] for r in iot.list_topic_rules()["rules"]] == ["temps"]


def test_bad_sql_is_a_sql_parse_exception_with_position(mooring):
    iot = mooring.client("iot")
    with pytest.raises(botocore.exceptions.ClientError) as bad:
        iot.create_topic_rule(ruleName="bad", topicRulePayload=payload("SELECT * FORM 'a/b'"))
    assert error_code(bad) == "SqlParseException"
    assert bad.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message = bad.value.response["Error"]["Message"]
    assert message.startswith("Line 1:9 expected FROM, WHERE or end of input but found 'FORM'"), message

    for sql, fragment in [
        ("SELECT temp FROM 'a/#/b'", "valid topic filter"),
        ("SELECT nosuchfunction(1) FROM 'a'", "unknown function"),
        ("SELECT [1, 2] AS a FROM 'a'", "2016-03-23"),
        ("SELECT CASE x WHEN 1 THEN 2 FROM 'a'", "WHEN, ELSE or END"),
        ("SELECT 'unterminated FROM 'a'", "closing"),
    ]:
        version = "2015-10-08" if "[1, 2]" in sql else "2016-03-23"
        with pytest.raises(botocore.exceptions.ClientError) as err:
            iot.create_topic_rule(
                ruleName="bad", topicRulePayload=payload(sql, awsIotSqlVersion=version)
            )
        assert error_code(err) == "SqlParseException", sql
        assert fragment in err.value.response["Error"]["Message"], (sql, err.value.response)

    # Replace validates the same way and leaves the stored rule untouched.
    iot.create_topic_rule(ruleName="good", topicRulePayload=payload("SELECT * FROM 'a'"))
    with pytest.raises(botocore.exceptions.ClientError) as bad_replace:
        iot.replace_topic_rule(ruleName="good", topicRulePayload=payload("SELECT FROM 'a'"))
    assert error_code(bad_replace) == "SqlParseException"
    assert iot.get_topic_rule(ruleName="good")["rule"]["sql"] == "SELECT * FROM 'a'"
    assert [r["ruleName"] for r in iot.list_topic_rules()["rules"]] == ["good"]


def test_invalid_requests(mooring):
    iot = mooring.client("iot")
    iot.create_topic_rule(ruleName="r1", topicRulePayload=payload("SELECT * FROM 'a'"))
    with pytest.raises(botocore.exceptions.ClientError) as dup:
        iot.create_topic_rule(ruleName="r1", topicRulePayload=payload("SELECT * FROM 'a'"))
    assert error_code(dup) == "ResourceAlreadyExistsException"
    assert dup.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409

    with pytest.raises(botocore.exceptions.ClientError) as unsupported:
        iot.create_topic_rule(
            ruleName="r2",
            topicRulePayload=payload(
                "SELECT * FROM 'a'",
                actions=[{"dynamoDB": {"roleArn": ROLE, "tableName": "t", "hashKeyField": "k", "hashKeyValue": "v"}}],
            ),
        )
    assert error_code(unsupported) == "InvalidRequestException"
    assert "'dynamoDB' is not supported by Mooring" in unsupported.value.response["Error"]["Message"]

    with pytest.raises(botocore.exceptions.ClientError) as no_role:
        iot.create_topic_rule(
            ruleName="r3",
            topicRulePayload=payload("SELECT * FROM 'a'", actions=[{"republish": {"roleArn": "", "topic": "x"}}]),
        )
    assert error_code(no_role) == "InvalidRequestException"

    with pytest.raises(botocore.exceptions.ClientError) as bad_template:
        iot.create_topic_rule(
            ruleName="r4",
            topicRulePayload=payload("SELECT * FROM 'a'", actions=[republish(topic="x/${topic(}")]),
        )
    assert error_code(bad_template) == "InvalidRequestException"

    with pytest.raises(botocore.exceptions.ClientError) as bad_version:
        iot.create_topic_rule(
            ruleName="r5", topicRulePayload=payload("SELECT * FROM 'a'", awsIotSqlVersion="2099-01-01")
        )
    assert error_code(bad_version) == "InvalidRequestException"

    for call in (
        lambda: iot.delete_topic_rule(ruleName="nope"),
        lambda: iot.enable_topic_rule(ruleName="nope"),
        lambda: iot.disable_topic_rule(ruleName="nope"),
        lambda: iot.replace_topic_rule(ruleName="nope", topicRulePayload=payload("SELECT * FROM 'a'")),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as missing:
            call()
        assert error_code(missing) == "UnauthorizedException"
    assert [r["ruleName"] for r in iot.list_topic_rules()["rules"]] == ["r1"]


def test_rules_survive_sigkill_and_restart(mooring):
    iot = mooring.client("iot")
    for i in range(5):
        iot.create_topic_rule(
            ruleName=f"rule_{i}",
            topicRulePayload=payload(f"SELECT * FROM 'devices/{i}/#'", description=f"n{i}"),
        )
    iot.disable_topic_rule(ruleName="rule_3")
    before = iot.get_topic_rule(ruleName="rule_2")
    mooring.kill()
    mooring.start()
    iot = mooring.client("iot")
    listed = iot.list_topic_rules()["rules"]
    assert [r["ruleName"] for r in listed] == [f"rule_{i}" for i in range(5)]
    assert [r["ruleDisabled"] for r in listed] == [False, False, False, True, False]
    after = iot.get_topic_rule(ruleName="rule_2")
    assert after["rule"] == before["rule"]
    assert after["ruleArn"] == before["ruleArn"]


def test_rules_declared_in_the_config_file(mooring_factory, tmp_path):
    config = tmp_path / "mooring.toml"
    config.write_text(
        """
[[iot.rules]]
name = "presence"
sql = "SELECT * FROM '$aws/events/#'"
description = "from the config file"
actions = [{ lambda = { functionArn = "arn:aws:lambda:us-east-1:000000000000:function:broker" } }]

[iot.functions.broker]
command = ["cat"]
"""
    )
    m = mooring_factory(extra_args=["--config", str(config)])
    iot = m.client("iot")
    rule = iot.get_topic_rule(ruleName="presence")["rule"]
    assert rule["sql"] == "SELECT * FROM '$aws/events/#'"
    assert rule["description"] == "from the config file"
    assert rule["actions"] == [
        {"lambda": {"functionArn": "arn:aws:lambda:us-east-1:000000000000:function:broker"}}
    ]
    assert rule["awsIotSqlVersion"] == "2016-03-23"

    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
[[iot.rules]]
name = "broken"
sql = "SELECT * FROM"
actions = []
"""
    )
    with pytest.raises(RuntimeError) as failed:
        mooring_factory(extra_args=["--config", str(bad)])
    assert "broken" in str(failed.value)
