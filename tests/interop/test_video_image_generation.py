"""Kinesis Video Streams image generation and notifications: the four configuration
operations through boto3 (exact shapes, validation errors, persistence across a restart) and
end to end: an ffmpeg stream whose MKV carries AWS_KINESISVIDEO_IMAGE_GENERATION /
AWS_KINESISVIDEO_NOTIFICATION Tags is ingested with PutMedia; the generated images land in
moto's S3 with the documented keys and metadata and decode with ffprobe, and the
notification reaches an SQS queue subscribed to moto's SNS topic (aws-sdk-sns) and Mooring's
MQTT topic, in the same SNS envelope."""

import json
import re
import subprocess
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from test_mqtt import Client
from test_rules_actions import MOTO_KEYS, moto  # noqa: F401  (the moto_server fixture)
from test_video import (ID_CLUSTER, ID_EBML, ID_SEGMENT, create, elements,
                        level1_element, mkv_tags, non_idle, put_file)
from test_video_images import pattern  # noqa: F401  (6 s of H.264 with B-frames, 1 s GOPs)

IMAGE_CONFIG = {
    "Status": "ENABLED",
    "ImageSelectorType": "PRODUCER_TIMESTAMP",
    "DestinationConfig": {"Uri": "s3://kvs-images/cams", "DestinationRegion": "us-east-1"},
    "SamplingInterval": 500,
    "Format": "JPEG",
    "FormatConfig": {"JPEGQuality": "70"},
    "WidthPixels": 160,
}
NOTIFY_CONFIG = {
    "Status": "ENABLED",
    "DestinationConfig": {"Uri": "arn:aws:sns:us-east-1:123456789012:kvs-events"},
}


def error(excinfo):
    return excinfo.value.response["Error"]["Code"], excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_configuration_operations_shapes_and_persistence(mooring):
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "configured", retention=2)

    # Nothing configured: the member is absent.
    r = kv.describe_image_generation_configuration(StreamName="configured")
    assert "ImageGenerationConfiguration" not in r
    r = kv.describe_notification_configuration(StreamARN=arn)
    assert "NotificationConfiguration" not in r

    r = kv.update_image_generation_configuration(StreamName="configured",
                                                 ImageGenerationConfiguration=IMAGE_CONFIG)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert set(r) == {"ResponseMetadata"}
    kv.update_notification_configuration(StreamARN=arn, NotificationConfiguration=NOTIFY_CONFIG)
    assert kv.describe_image_generation_configuration(StreamARN=arn)["ImageGenerationConfiguration"] == IMAGE_CONFIG
    assert kv.describe_notification_configuration(StreamName="configured")["NotificationConfiguration"] == NOTIFY_CONFIG

    # Survives a restart.
    mooring.kill()
    mooring.start()
    kv = mooring.client("kinesisvideo")
    assert kv.describe_image_generation_configuration(StreamName="configured")["ImageGenerationConfiguration"] == IMAGE_CONFIG
    assert kv.describe_notification_configuration(StreamName="configured")["NotificationConfiguration"] == NOTIFY_CONFIG

    # Replacing, then deleting by leaving the configuration out.
    png = dict(IMAGE_CONFIG, Format="PNG", Status="DISABLED")
    del png["FormatConfig"], png["WidthPixels"]
    kv.update_image_generation_configuration(StreamName="configured", ImageGenerationConfiguration=png)
    assert kv.describe_image_generation_configuration(StreamName="configured")["ImageGenerationConfiguration"] == png
    kv.update_image_generation_configuration(StreamName="configured")
    assert "ImageGenerationConfiguration" not in kv.describe_image_generation_configuration(StreamName="configured")
    kv.update_notification_configuration(StreamName="configured")
    assert "NotificationConfiguration" not in kv.describe_notification_configuration(StreamName="configured")


@pytest.mark.parametrize("change, needle", [
    ({"Status": "ON"}, "enum value set"),
    ({"ImageSelectorType": "CLOCK"}, "enum value set"),
    ({"Format": "GIF"}, "enum value set"),
    ({"SamplingInterval": 199}, "greater than or equal to 200"),
    ({"WidthPixels": 3841}, "between 1 and 3840"),
    ({"HeightPixels": 2161}, "between 1 and 2160"),
    ({"FormatConfig": {"JPEGQuality": "0"}}, "JPEGQuality"),
    ({"DestinationConfig": {"Uri": "s3://kvs-images/*", "DestinationRegion": "us-east-1"}}, "pattern"),
    ({"DestinationConfig": {"Uri": "s3://kvs-images", "DestinationRegion": "eu-west-1"}}, "must match"),
    ({"DestinationConfig": {"Uri": "s3://kvs-images", "DestinationRegion": "EU_WEST_1"}}, "pattern"),
])
def test_image_generation_validation_errors(mooring, change, needle):
    kv = mooring.client("kinesisvideo")
    if "validating" not in [s["StreamName"] for s in kv.list_streams()["StreamInfoList"]]:
        create(kv, "validating", retention=1)
    config = dict(IMAGE_CONFIG, **change)
    with pytest.raises(ClientError) as e:
        kv.update_image_generation_configuration(StreamName="validating", ImageGenerationConfiguration=config)
    assert error(e) == ("InvalidArgumentException", 400)
    assert needle in e.value.response["Error"]["Message"]
    assert "ImageGenerationConfiguration" not in kv.describe_image_generation_configuration(StreamName="validating")


def test_configuration_errors(mooring):
    kv = mooring.client("kinesisvideo")
    arn = create(kv, "live-only", retention=0)
    with pytest.raises(ClientError) as e:
        kv.update_image_generation_configuration(StreamName="live-only", ImageGenerationConfiguration=IMAGE_CONFIG)
    assert error(e) == ("NoDataRetentionException", 400)
    with pytest.raises(ClientError) as e:
        kv.update_notification_configuration(StreamName="live-only", NotificationConfiguration=NOTIFY_CONFIG)
    assert error(e) == ("NoDataRetentionException", 400)
    with pytest.raises(ClientError) as e:
        kv.describe_notification_configuration(StreamName="missing")
    assert error(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as e:
        kv.update_image_generation_configuration(StreamName="missing", ImageGenerationConfiguration=IMAGE_CONFIG)
    assert error(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(ClientError) as e:
        kv.describe_image_generation_configuration(StreamName="live-only", StreamARN=arn)
    assert error(e) == ("InvalidArgumentException", 400)
    with pytest.raises(ClientError) as e:
        kv.describe_image_generation_configuration()
    assert error(e) == ("InvalidArgumentException", 400)
    with pytest.raises(ClientError) as e:
        kv.update_notification_configuration(
            StreamARN=arn, NotificationConfiguration={"Status": "ENABLED", "DestinationConfig": {"Uri": "x" * 256}})
    assert error(e) == ("InvalidArgumentException", 400)
    with pytest.raises(ClientError) as e:
        kv.update_notification_configuration(
            StreamARN=arn, NotificationConfiguration={"Status": "PAUSED", "DestinationConfig": {"Uri": "arn:aws:sns:x"}})
    assert error(e) == ("InvalidArgumentException", 400)


def with_tags(mkv, tags_after):
    """The MKV with Tags elements inserted after the clusters whose index is a key of
    `tags_after` (tags following a cluster belong to that cluster's fragment)."""
    _, _, header_stop = next(elements(mkv, 0))
    seg_id, seg_start, _ = next(elements(mkv, header_stop))
    assert seg_id == ID_SEGMENT
    out, pos, cluster, copied = [], seg_start, 0, 0
    while pos < len(mkv):
        eid, _, stop = level1_element(mkv, pos)
        if eid == ID_EBML:
            break
        if eid == ID_CLUSTER:
            out.append(mkv[copied:stop])
            copied = stop
            if cluster in tags_after:
                out.append(mkv_tags(tags_after[cluster]))
            cluster += 1
        pos = stop
    out.append(mkv[copied:])
    return b"".join(out)


def eventually(fetch, timeout=20.0):
    deadline = time.time() + timeout
    while True:
        value = fetch()
        if value or time.time() > deadline:
            return value
        time.sleep(0.3)


def test_tagged_fragments_generate_images_and_notifications(mooring_factory, moto, pattern, tmp_path):  # noqa: F811
    s3 = boto3.client("s3", endpoint_url=moto, **MOTO_KEYS)
    s3.create_bucket(Bucket="kvs-images")
    sns = boto3.client("sns", endpoint_url=moto, **MOTO_KEYS)
    sqs = boto3.client("sqs", endpoint_url=moto, **MOTO_KEYS)
    topic_arn = sns.create_topic(Name="kvs-events")["TopicArn"]
    assert topic_arn == NOTIFY_CONFIG["DestinationConfig"]["Uri"].replace("123456789012", topic_arn.split(":")[4])
    queue_url = sqs.create_queue(QueueName="kvs-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    notify_config = dict(NOTIFY_CONFIG, DestinationConfig={"Uri": topic_arn})
    m = mooring_factory(env={
        "MOORING_VIDEO__SNS_NOTIFICATIONS": "true",
        "MOORING_VIDEO__OUTBOUND__ENDPOINT_URL": moto,
        "MOORING_VIDEO__OUTBOUND__ACCESS_KEY_ID": "testing",
        "MOORING_VIDEO__OUTBOUND__SECRET_ACCESS_KEY": "testing",
        "MOORING_VIDEO__OUTBOUND__REGION": "us-east-1",
    })
    kv = m.client("kinesisvideo")
    arn = create(kv, "tagged", retention=1)
    kv.update_image_generation_configuration(StreamName="tagged", ImageGenerationConfiguration=IMAGE_CONFIG)
    kv.update_notification_configuration(StreamName="tagged", NotificationConfiguration=notify_config)
    account = arn.split(":")[4]

    watcher = Client(m)
    watcher.sub("kinesisvideo/tagged/notifications", 1)

    data = with_tags(pattern.data, {
        1: [("AWS_KINESISVIDEO_NOTIFICATION", ""), ("door", "open"), ("zone", "7")],
        2: [("AWS_KINESISVIDEO_IMAGE_GENERATION", ""), ("AWS_KINESISVIDEO_IMAGE_PREFIX", "porch"),
            ("camera", "north")],
    })
    pm, acks = put_file(m, "tagged", data)
    assert pm.status == 200
    persisted = {a["FragmentTimecode"]: a["FragmentNumber"] for a in non_idle(acks) if a["EventType"] == "PERSISTED"}
    # ffmpeg starts a cluster at each 1 s keyframe.
    tcs = sorted(persisted)
    assert tcs == [0, 1000, 2000, 3000, 4000, 5000], acks

    # The notification through SNS: what the SQS subscriber receives is SNS's envelope.
    def received():
        return sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages")
    delivered = eventually(received)
    assert delivered and len(delivered) == 1, delivered
    via_sns = json.loads(delivered[0]["Body"])
    assert via_sns["Type"] == "Notification" and via_sns["TopicArn"] == topic_arn
    assert via_sns["Subject"] == "Kinesis Video Streams Notification"
    # The same message on Mooring's MQTT topic, in the same envelope.
    msg = watcher.expect("kinesisvideo/tagged/notifications", timeout=20)
    envelope = json.loads(msg.payload)
    assert envelope["Type"] == "Notification"
    assert envelope["Subject"] == "Kinesis Video Streams Notification"
    assert envelope["TopicArn"] == topic_arn
    assert json.loads(via_sns["Message"]) == json.loads(envelope["Message"])
    message = json.loads(envelope["Message"])
    assert message["StreamArn"] == arn
    assert message["FragmentNumber"] == persisted[tcs[1]]
    assert message["FragmentStartProducerTimestamp"] == tcs[1]
    assert isinstance(message["FragmentStartServerTimestamp"], int)
    assert abs(message["FragmentStartServerTimestamp"] / 1000 - time.time()) < 120
    assert message["NotificationType"] == "PERSISTED"
    assert message["NotificationPayload"] == {"door": "open", "zone": "7"}

    # The images: fragment 2 (producer tcs[2] to tcs[3] ms) sampled every 500 ms.
    def listed():
        objects = s3.list_objects_v2(Bucket="kvs-images").get("Contents", [])
        return objects if len(objects) >= 2 else None
    objects = eventually(listed)
    assert objects, "no images were written:\n" + m.log()[-3000:]
    keys = sorted(o["Key"] for o in objects)
    assert len(keys) == 2, keys
    key_pattern = rf"cams/porch_{account}_tagged_(\d+)_[0-9a-f-]{{36}}\.jpg"
    assert [int(re.fullmatch(key_pattern, k).group(1)) for k in keys] == [tcs[2], tcs[2] + 500], keys
    for key in keys:
        head = s3.head_object(Bucket="kvs-images", Key=key)
        assert head["ContentType"] == "image/jpeg"
        meta = head["Metadata"]
        assert meta["aws_kinesisvideo_fragment_number"] == persisted[tcs[2]]
        assert meta["aws_kinesisvideo_producer_timestamp"] == str(tcs[2])
        assert int(meta["aws_kinesisvideo_server_timestamp"]) > 1_600_000_000_000
        assert meta["camera"] == "north"
        body = s3.get_object(Bucket="kvs-images", Key=key)["Body"].read()
        assert body[:3] == b"\xff\xd8\xff"
        path = tmp_path / key.replace("/", "_")
        path.write_bytes(body)
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,width,height",
                                "-of", "json", str(path)], capture_output=True, text=True, check=True)
        stream = json.loads(probe.stdout)["streams"][0]
        assert (stream["codec_name"], stream["width"], stream["height"]) == ("mjpeg", 160, 120)
        decoded = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"],
                                 capture_output=True, text=True)
        assert decoded.returncode == 0, decoded.stderr

    # Untagged fragments and disabled configurations produce nothing more.
    kv.update_notification_configuration(StreamName="tagged",
                                         NotificationConfiguration=dict(notify_config, Status="DISABLED"))
    later = with_tags(pattern.data, {3: [("AWS_KINESISVIDEO_NOTIFICATION", "")]})
    put_file(m, "tagged", later, start_timestamp=str(int(time.time())))
    with pytest.raises(Exception):
        watcher.expect("kinesisvideo/tagged/notifications", timeout=3)
    assert len(s3.list_objects_v2(Bucket="kvs-images")["Contents"]) == 2
    assert not sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages")
