"""Registry control plane (`aws iot` CreateThing and friends) driven with boto3 and the AWS CLI.

Checks AWS's exact response shapes, the documented errors (ResourceAlreadyExists with
resourceId/resourceArn, VersionConflict, ResourceNotFound, InvalidRequest), attribute merge
semantics, paging, and that an acknowledged thing survives a SIGKILL and restart.
"""

import json
import subprocess

import botocore.exceptions
import pytest


def error_of(excinfo):
    return excinfo.value.response["Error"]["Code"], excinfo.value.response


def test_thing_lifecycle_shapes(mooring):
    iot = mooring.client("iot")
    region = mooring.endpoints["region"]
    created = iot.create_thing(
        thingName="sensor-1", attributePayload={"attributes": {"floor": "3", "room": "a-12"}}
    )
    assert created["thingName"] == "sensor-1"
    assert created["thingArn"] == f"arn:aws:iot:{region}:000000000000:thing/sensor-1"
    assert len(created["thingId"]) == 36
    body = {k: v for k, v in created.items() if k != "ResponseMetadata"}
    assert set(body) == {"thingName", "thingArn", "thingId"}

    described = iot.describe_thing(thingName="sensor-1")
    body = {k: v for k, v in described.items() if k != "ResponseMetadata"}
    assert body == {
        "defaultClientId": "sensor-1",
        "thingName": "sensor-1",
        "thingId": created["thingId"],
        "thingArn": created["thingArn"],
        "attributes": {"floor": "3", "room": "a-12"},
        "version": 1,
    }

    # An identical CreateThing succeeds with the same id; a different one conflicts.
    again = iot.create_thing(
        thingName="sensor-1", attributePayload={"attributes": {"floor": "3", "room": "a-12"}}
    )
    assert again["thingId"] == created["thingId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName="sensor-1")
    code, resp = error_of(e)
    assert code == "ResourceAlreadyExistsException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert resp["resourceId"] == created["thingId"]
    assert resp["resourceArn"] == created["thingArn"]

    # Merge removes attributes given an empty value and bumps the version.
    iot.update_thing(
        thingName="sensor-1",
        attributePayload={"attributes": {"floor": "", "zone": "north"}, "merge": True},
        expectedVersion=1,
    )
    described = iot.describe_thing(thingName="sensor-1")
    assert described["attributes"] == {"room": "a-12", "zone": "north"}
    assert described["version"] == 2
    # Without merge the attributes are replaced.
    iot.update_thing(thingName="sensor-1", attributePayload={"attributes": {"only": "one"}})
    assert iot.describe_thing(thingName="sensor-1")["attributes"] == {"only": "one"}

    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.update_thing(thingName="sensor-1", attributePayload={"attributes": {}}, expectedVersion=1)
    code, resp = error_of(e)
    assert code == "VersionConflictException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 409

    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_thing(thingName="sensor-1", expectedVersion=1)
    assert error_of(e)[0] == "VersionConflictException"
    iot.delete_thing(thingName="sensor-1", expectedVersion=3)
    # Deleting a missing thing succeeds, as the model documents.
    iot.delete_thing(thingName="sensor-1")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_thing(thingName="sensor-1")
    code, resp = error_of(e)
    assert code == "ResourceNotFoundException"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_thing_validation_errors(mooring):
    iot = mooring.client("iot")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName="has space")
    assert error_of(e)[0] == "InvalidRequestException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(
            thingName="many", attributePayload={"attributes": {k: "v" for k in "abcd"}}
        )
    assert error_of(e)[0] == "InvalidRequestException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName="typed", thingTypeName="no-such-type")
    assert error_of(e)[0] == "ResourceNotFoundException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_thing(thingName="bad-value", attributePayload={"attributes": {"a": "b c"}})
    assert error_of(e)[0] == "InvalidRequestException"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.list_things(maxResults=251)
    assert error_of(e)[0] == "InvalidRequestException"


def test_list_things_filters_and_pages(mooring):
    iot = mooring.client("iot")
    for i in range(7):
        iot.create_thing(
            thingName=f"dev-{i}", attributePayload={"attributes": {"rack": f"r{i % 3}"}}
        )
    names = []
    kwargs = {"maxResults": 3}
    pages = 0
    while True:
        page = iot.list_things(**kwargs)
        pages += 1
        for item in page["things"]:
            assert set(item) == {"thingName", "thingArn", "attributes", "version"}
        names += [t["thingName"] for t in page["things"]]
        if "nextToken" not in page:
            break
        kwargs["nextToken"] = page["nextToken"]
    assert names == [f"dev-{i}" for i in range(7)]
    assert pages == 3
    paginated = [
        t["thingName"]
        for p in iot.get_paginator("list_things").paginate(PaginationConfig={"PageSize": 2})
        for t in p["things"]
    ]
    assert paginated == names
    r1 = iot.list_things(attributeName="rack", attributeValue="r1")["things"]
    assert [t["thingName"] for t in r1] == ["dev-1", "dev-4"]
    prefixed = iot.list_things(attributeName="rack", attributeValue="r", usePrefixAttributeValue=True)
    assert len(prefixed["things"]) == 7


def test_cli_and_durability_across_sigkill(mooring):
    env = mooring.cli_env()
    out = subprocess.run(
        ["aws", "iot", "create-thing", "--thing-name", "cli-thing", "--endpoint-url", mooring.url,
         "--attribute-payload", '{"attributes":{"k":"v"}}'],
        env=env, check=True, capture_output=True, text=True,
    )
    assert json.loads(out.stdout)["thingName"] == "cli-thing"
    mooring.kill()
    mooring.start()
    iot = mooring.client("iot")
    assert iot.describe_thing(thingName="cli-thing")["attributes"] == {"k": "v"}
