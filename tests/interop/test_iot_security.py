"""IoT security control plane, policy enforcement on the broker, and iot-data over HTTP,
against the real `mooring` binary.

boto3 and the AWS CLI drive every certificate, policy (with its versions), principal and
endpoint operation and check the exact shapes and errors; awsiotsdk connects over mTLS with a
certificate from CreateKeysAndCertificate; policies attached to a thing group apply to its
things' connections; paho (3.1.1 and 5) over mTLS checks policy denials (refused connect
with its connect_failed event, denied publish, denied subscribe) and that deactivating a
certificate drops its live connection; iot-data publishes reach a paho subscriber and
retained messages are listed and fetched; a SIGKILL and restart keeps certificates, policies
and attachments.
"""

import base64
import datetime
import hashlib
import json
import ssl
import subprocess
import time
import uuid

import botocore.exceptions
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from test_mqtt import V311, V5, Client, event, hostport, observer

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})


def error_of(excinfo):
    e = excinfo.value.response
    return e["Error"]["Code"], e["ResponseMetadata"]["HTTPStatusCode"]


def refusal(call, **kwargs):
    """The (error code, HTTP status) of `call(**kwargs)`, which must fail."""
    with pytest.raises(botocore.exceptions.ClientError) as e:
        call(**kwargs)
    return error_of(e)


def cli(m, *args, check=True):
    out = subprocess.run(["aws", "--endpoint-url", m.url, *args, "--output", "json"],
                         env=m.cli_env(), capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def arn(m, resource):
    return f"arn:aws:iot:{m.endpoints['region']}:000000000000:{resource}"


class Device:
    """A certificate from CreateKeysAndCertificate written to files, with a TLS context."""

    def __init__(self, m, tmp_path, active=True, policy=None):
        self.iot = m.client("iot")
        r = self.iot.create_keys_and_certificate(setAsActive=active)
        self.id, self.arn = r["certificateId"], r["certificateArn"]
        self.cert_pem, self.key_pem = r["certificatePem"], r["keyPair"]["PrivateKey"]
        self.cert_path = tmp_path / f"{self.id[:12]}.pem"
        self.key_path = tmp_path / f"{self.id[:12]}.key"
        self.cert_path.write_text(self.cert_pem)
        self.key_path.write_text(self.key_pem)
        self.ca_path = m.data_dir / "ca" / "ca.pem"
        if policy is not None:
            name = f"p-{uuid.uuid4().hex[:8]}"
            self.iot.create_policy(policyName=name, policyDocument=policy)
            self.iot.attach_policy(policyName=name, target=self.arn)
            self.policy_name = name

    def tls(self):
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


def policy(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


# ---- certificates --------------------------------------------------------------------------

def test_create_describe_update_delete_certificate(mooring):
    iot = mooring.client("iot")
    r = iot.create_keys_and_certificate(setAsActive=True)
    assert set(r) - {"ResponseMetadata"} == {"certificateArn", "certificateId", "certificatePem", "keyPair"}
    cid = r["certificateId"]
    assert len(cid) == 64 and r["certificateArn"] == arn(mooring, f"cert/{cid}")
    assert r["keyPair"]["PrivateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert r["keyPair"]["PublicKey"].startswith("-----BEGIN PUBLIC KEY-----")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate(r["certificatePem"].encode())
    assert cert.public_key().key_size == 2048
    der = cert.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == cid
    ca = x509.load_pem_x509_certificate((mooring.data_dir / "ca" / "ca.pem").read_bytes())
    assert cert.issuer == ca.subject

    d = iot.describe_certificate(certificateId=cid)["certificateDescription"]
    assert d["status"] == "ACTIVE" and d["certificateId"] == cid
    assert d["certificatePem"] == r["certificatePem"] and d["ownedBy"] == "000000000000"
    assert d["certificateMode"] == "DEFAULT" and d["customerVersion"] == 1
    assert isinstance(d["creationDate"], datetime.datetime)
    assert d["validity"]["notAfter"] > d["validity"]["notBefore"]
    assert len(d["caCertificateId"]) == 64

    inactive = iot.create_keys_and_certificate()  # setAsActive defaults to false
    assert iot.describe_certificate(certificateId=inactive["certificateId"])[
        "certificateDescription"]["status"] == "INACTIVE"
    listed = iot.list_certificates()["certificates"]
    assert {c["certificateId"] for c in listed} == {cid, inactive["certificateId"]}
    assert set(listed[0]) == {"certificateArn", "certificateId", "status", "certificateMode", "creationDate"}
    page = iot.list_certificates(pageSize=1)
    assert len(page["certificates"]) == 1 and "nextMarker" in page
    rest = iot.list_certificates(pageSize=1, marker=page["nextMarker"])
    assert len(rest["certificates"]) == 1 and "nextMarker" not in rest

    # Deleting an ACTIVE certificate: 406; attached to a policy: 409 unless forced.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_certificate(certificateId=cid)
    assert error_of(e) == ("CertificateStateException", 406)
    iot.update_certificate(certificateId=cid, newStatus="INACTIVE")
    d = iot.describe_certificate(certificateId=cid)["certificateDescription"]
    assert d["status"] == "INACTIVE" and d["customerVersion"] == 2
    iot.create_policy(policyName="cert-pol", policyDocument=ALLOW_ALL)
    iot.attach_policy(policyName="cert-pol", target=r["certificateArn"])
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_certificate(certificateId=cid)
    assert error_of(e) == ("DeleteConflictException", 409)
    iot.update_certificate(certificateId=cid, newStatus="REVOKED")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.update_certificate(certificateId=cid, newStatus="ACTIVE")
    assert error_of(e) == ("CertificateStateException", 406)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.update_certificate(certificateId=cid, newStatus="BOGUS")
    assert error_of(e) == ("InvalidRequestException", 400)
    iot.delete_certificate(certificateId=cid, forceDelete=True)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_certificate(certificateId=cid)
    assert error_of(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_certificate(certificateId="z" * 64)
    assert error_of(e) == ("InvalidRequestException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_certificate(certificateId="0" * 64)
    assert error_of(e) == ("ResourceNotFoundException", 404)


def _self_signed_ca_and_cert(ca_key_pem=None, ca_cert_pem=None):
    """A device certificate signed by the given CA, or by a fresh foreign CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    if ca_key_pem is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(ca_key, hashes.SHA256()))
    else:
        ca_key = serialization.load_pem_private_key(ca_key_pem, None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "registered-dev"),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return pem(ca_cert), pem(cert), key_pem


def test_register_certificate(mooring):
    iot = mooring.client("iot")
    ca_dir = mooring.data_dir / "ca"
    _, cert_pem, _ = _self_signed_ca_and_cert((ca_dir / "ca.key").read_bytes(),
                                              (ca_dir / "ca.pem").read_bytes())
    r = iot.register_certificate(certificatePem=cert_pem, status="ACTIVE")
    assert set(r) - {"ResponseMetadata"} == {"certificateArn", "certificateId"}
    d = iot.describe_certificate(certificateId=r["certificateId"])["certificateDescription"]
    assert d["status"] == "ACTIVE" and d["certificatePem"] == cert_pem
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.register_certificate(certificatePem=cert_pem)
    assert error_of(e) == ("ResourceAlreadyExistsException", 409)
    assert e.value.response["resourceId"] == r["certificateId"]
    assert e.value.response["resourceArn"] == r["certificateArn"]

    foreign_ca, foreign_cert, _ = _self_signed_ca_and_cert()
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.register_certificate(certificatePem=foreign_cert)
    assert error_of(e) == ("CertificateValidationException", 400)
    r2 = iot.register_certificate(certificatePem=foreign_cert, caCertificatePem=foreign_ca)
    d2 = iot.describe_certificate(certificateId=r2["certificateId"])["certificateDescription"]
    assert d2["status"] == "INACTIVE"
    assert d2["caCertificateId"] == hashlib.sha256(
        base64.b64decode("".join(foreign_ca.strip().splitlines()[1:-1]))).hexdigest()
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.register_certificate(certificatePem="not a certificate")
    assert error_of(e) == ("CertificateValidationException", 400)
    # The CLI's setAsActive flag
    _, cert3, _ = _self_signed_ca_and_cert((ca_dir / "ca.key").read_bytes(),
                                           (ca_dir / "ca.pem").read_bytes())
    out = json.loads(cli(mooring, "iot", "register-certificate", "--certificate-pem", cert3,
                         "--set-as-active").stdout)
    assert iot.describe_certificate(certificateId=out["certificateId"])[
        "certificateDescription"]["status"] == "ACTIVE"


# ---- policies ------------------------------------------------------------------------------

def test_policy_operations(mooring):
    iot = mooring.client("iot")
    doc = policy({"Effect": "Allow", "Action": ["iot:Connect"], "Resource": "*"})
    r = iot.create_policy(policyName="pol.a", policyDocument=doc)
    assert {k: r[k] for k in ("policyName", "policyArn", "policyDocument", "policyVersionId")} == {
        "policyName": "pol.a", "policyArn": arn(mooring, "policy/pol.a"),
        "policyDocument": doc, "policyVersionId": "1"}
    g = iot.get_policy(policyName="pol.a")
    assert g["policyDocument"] == doc and g["defaultVersionId"] == "1"
    assert isinstance(g["creationDate"], datetime.datetime) and g["generationId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy(policyName="pol.a", policyDocument=doc)
    assert error_of(e) == ("ResourceAlreadyExistsException", 409)
    for bad in ["{not json", json.dumps({"Statement": [{"Effect": "Perhaps", "Action": "iot:*", "Resource": "*"}]}),
                json.dumps({"Version": "2012-10-17", "Statement": []}),
                json.dumps({"Statement": {"Effect": "Allow", "Action": "iot:*"}})]:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            iot.create_policy(policyName="bad", policyDocument=bad)
        assert error_of(e) == ("MalformedPolicyException", 400), bad
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.create_policy(policyName="bad name!", policyDocument=doc)
    assert error_of(e) == ("InvalidRequestException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.get_policy(policyName="missing")
    assert error_of(e) == ("ResourceNotFoundException", 404)

    out = json.loads(cli(mooring, "iot", "create-policy", "--policy-name", "pol-b",
                         "--policy-document", ALLOW_ALL).stdout)
    assert out["policyVersionId"] == "1"
    listed = json.loads(cli(mooring, "iot", "list-policies").stdout)["policies"]
    assert sorted(listed, key=lambda p: p["policyName"]) == [
        {"policyName": "pol-b", "policyArn": arn(mooring, "policy/pol-b")},
        {"policyName": "pol.a", "policyArn": arn(mooring, "policy/pol.a")}]
    page = iot.list_policies(pageSize=1)
    assert len(page["policies"]) == 1 and page["nextMarker"]

    cert = iot.create_keys_and_certificate()
    iot.attach_policy(policyName="pol.a", target=cert["certificateArn"])
    iot.attach_policy(policyName="pol.a", target=cert["certificateArn"])  # idempotent
    iot.attach_policy(policyName="pol-b", target=cert["certificateArn"])
    attached = iot.list_attached_policies(target=cert["certificateArn"])["policies"]
    assert sorted(p["policyName"] for p in attached) == ["pol-b", "pol.a"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_policy(policyName="missing", target=cert["certificateArn"])
    assert error_of(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_policy(policyName="pol.a", target=arn(mooring, "cert/" + "a" * 64))
    assert error_of(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_policy(policyName="pol.a")
    assert error_of(e) == ("DeleteConflictException", 409)
    iot.detach_policy(policyName="pol.a", target=cert["certificateArn"])
    assert [p["policyName"] for p in iot.list_attached_policies(
        target=cert["certificateArn"])["policies"]] == ["pol-b"]
    iot.delete_policy(policyName="pol.a")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_policy(policyName="pol.a")
    assert error_of(e) == ("ResourceNotFoundException", 404)
    # Ten policies per target at most: the eleventh is LimitExceededException (410).
    for i in range(9):
        iot.create_policy(policyName=f"lim{i}", policyDocument=ALLOW_ALL)
        iot.attach_policy(policyName=f"lim{i}", target=cert["certificateArn"])
    iot.create_policy(policyName="lim-extra", policyDocument=ALLOW_ALL)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_policy(policyName="lim-extra", target=cert["certificateArn"])
    assert error_of(e) == ("LimitExceededException", 410)


def test_policy_versions(mooring, tmp_path):
    """CreatePolicyVersion, GetPolicyVersion, ListPolicyVersions, SetDefaultPolicyVersion and
    DeletePolicyVersion through boto3 and the CLI: shapes, the 5-version limit, the errors, the
    default version deciding a live connection's next publish, and a restart keeping it all."""
    iot = mooring.client("iot")
    allow_a = policy({"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"],
                      "Resource": "*"},
                     {"Effect": "Deny", "Action": "iot:Publish", "Resource": arn(mooring, "topic/versions/b")})
    allow_b = policy({"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"],
                      "Resource": "*"},
                     {"Effect": "Deny", "Action": "iot:Publish", "Resource": arn(mooring, "topic/versions/a")})
    dev = Device(mooring, tmp_path, policy=allow_a)
    name, policy_arn = dev.policy_name, arn(mooring, f"policy/{dev.policy_name}")

    r = iot.create_policy_version(policyName=name, policyDocument=allow_b)
    assert {k: r[k] for k in ("policyArn", "policyDocument", "policyVersionId", "isDefaultVersion")} == {
        "policyArn": policy_arn, "policyDocument": allow_b, "policyVersionId": "2", "isDefaultVersion": False}
    g = iot.get_policy_version(policyName=name, policyVersionId="2")
    assert {k: g[k] for k in ("policyArn", "policyName", "policyDocument", "policyVersionId", "isDefaultVersion")} == {
        "policyArn": policy_arn, "policyName": name, "policyDocument": allow_b, "policyVersionId": "2",
        "isDefaultVersion": False}
    assert isinstance(g["creationDate"], datetime.datetime) and g["generationId"]
    assert iot.get_policy_version(policyName=name, policyVersionId="1")["isDefaultVersion"] is True
    assert iot.get_policy(policyName=name)["defaultVersionId"] == "1"
    listed = iot.list_policy_versions(policyName=name)["policyVersions"]
    assert [(v["versionId"], v["isDefaultVersion"]) for v in listed] == [("2", False), ("1", True)]
    assert all(isinstance(v["createDate"], datetime.datetime) for v in listed)

    # Version 1 is the default: versions/a is allowed, versions/b denied (PUBACK 0x87).
    c = Client(mooring, client_id="versions-dev", protocol=V5, tls_context=dev.tls())
    assert c.pubacks[c.pub("versions/a", b"1", 1).mid].value == 0
    assert c.pubacks[c.pub("versions/b", b"1", 1).mid].value == 0x87
    # Switching the default takes effect on the live connection's next publish.
    iot.set_default_policy_version(policyName=name, policyVersionId="2")
    assert iot.get_policy(policyName=name)["defaultVersionId"] == "2"
    assert iot.get_policy(policyName=name)["policyDocument"] == allow_b
    assert c.pubacks[c.pub("versions/a", b"2", 1).mid].value == 0x87
    assert c.pubacks[c.pub("versions/b", b"2", 1).mid].value == 0

    # setAsDefault on create; at most 5 versions; ids are never reused.
    for expected in ("3", "4", "5"):
        r = iot.create_policy_version(policyName=name, policyDocument=allow_a, setAsDefault=expected == "5")
        assert r["policyVersionId"] == expected and r["isDefaultVersion"] is (expected == "5")
    assert iot.get_policy(policyName=name)["defaultVersionId"] == "5"
    assert c.pubacks[c.pub("versions/a", b"5", 1).mid].value == 0
    assert refusal(iot.create_policy_version, policyName=name, policyDocument=allow_a) == ("VersionsLimitExceededException", 409)
    iot.delete_policy_version(policyName=name, policyVersionId="4")
    assert iot.create_policy_version(policyName=name, policyDocument=allow_b)["policyVersionId"] == "6"

    # Errors: the default version cannot be deleted, nor a policy with other versions; unknown
    # versions and policies are 404; a malformed document or version id is 400.
    assert refusal(iot.delete_policy_version, policyName=name, policyVersionId="5") == ("DeleteConflictException", 409)
    iot.detach_policy(policyName=name, target=dev.arn)
    assert refusal(iot.delete_policy, policyName=name) == ("DeleteConflictException", 409)
    iot.attach_policy(policyName=name, target=dev.arn)
    for call, args in [(iot.get_policy_version, {"policyVersionId": "4"}),
                       (iot.set_default_policy_version, {"policyVersionId": "9"}),
                       (iot.delete_policy_version, {"policyVersionId": "4"})]:
        assert refusal(call, policyName=name, **args) == ("ResourceNotFoundException", 404), call
    assert refusal(iot.list_policy_versions, policyName="no-such-policy") == ("ResourceNotFoundException", 404)
    assert refusal(iot.create_policy_version, policyName=name, policyDocument="{not json") == ("MalformedPolicyException", 400)
    assert refusal(iot.get_policy_version, policyName=name, policyVersionId="latest") == ("InvalidRequestException", 400)

    # The CLI's view, and everything after a SIGKILL and restart.
    out = json.loads(cli(mooring, "iot", "list-policy-versions", "--policy-name", name).stdout)
    assert [(v["versionId"], v["isDefaultVersion"]) for v in out["policyVersions"]] == [
        ("6", False), ("5", True), ("3", False), ("2", False), ("1", False)]
    c.stop()
    mooring.kill()
    mooring.start()
    iot = mooring.client("iot")
    after = iot.list_policy_versions(policyName=name)["policyVersions"]
    assert [(v["versionId"], v["isDefaultVersion"]) for v in after] == [
        ("6", False), ("5", True), ("3", False), ("2", False), ("1", False)]
    assert iot.get_policy_version(policyName=name, policyVersionId="2")["policyDocument"] == allow_b
    # The highest id handed out survives too.
    iot.delete_policy_version(policyName=name, policyVersionId="1")
    assert iot.create_policy_version(policyName=name, policyDocument=allow_b)["policyVersionId"] == "7"
    c = Client(mooring, client_id="versions-dev", protocol=V5, tls_context=dev.tls())
    assert c.pubacks[c.pub("versions/a", b"after", 1).mid].value == 0
    assert c.pubacks[c.pub("versions/b", b"after", 1).mid].value == 0x87
    # Deleting every other version lets the policy go (once detached).
    for v in ("7", "6", "3", "2"):
        iot.delete_policy_version(policyName=name, policyVersionId=v)
    c.stop()
    iot.detach_policy(policyName=name, target=dev.arn)
    iot.delete_policy(policyName=name)
    assert refusal(iot.get_policy, policyName=name) == ("ResourceNotFoundException", 404)


def test_thing_group_policies_apply_to_the_things_connections(mooring, tmp_path):
    """A policy attached to a thing group applies to connections whose client id is a thing
    in that group (or in a descendant) attached to the certificate, as AWS IoT's thing group
    policies do; leaving the group takes it away on the next publish."""
    iot = mooring.client("iot")
    # The certificate's own policy connects and subscribes; publishing comes from the group.
    dev = Device(mooring, tmp_path, policy=policy(
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"], "Resource": "*"}))
    iot.create_thing(thingName="grouped-dev")
    iot.attach_thing_principal(thingName="grouped-dev", principal=dev.arn)
    parent = iot.create_thing_group(thingGroupName="tg-parent")
    iot.create_thing_group(thingGroupName="tg-child", parentGroupName="tg-parent")
    iot.create_policy(policyName="tg-publish", policyDocument=policy(
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": arn(mooring, "topic/groups/*")}))
    iot.attach_policy(policyName="tg-publish", target=parent["thingGroupArn"])
    assert [p["policyName"] for p in iot.list_attached_policies(target=parent["thingGroupArn"])["policies"]] == [
        "tg-publish"]

    c = Client(mooring, client_id="grouped-dev", protocol=V5, tls_context=dev.tls())
    assert c.pubacks[c.pub("groups/a", b"before", 1).mid].value == 0x87
    # In the child group: the parent's policy is inherited.
    iot.add_thing_to_thing_group(thingGroupName="tg-child", thingName="grouped-dev")
    deadline = time.time() + 10
    while c.pubacks[c.pub("groups/a", b"member", 1).mid].value != 0:
        assert time.time() < deadline, "the group's policy never applied"
        time.sleep(0.1)
    assert c.pubacks[c.pub("elsewhere", b"member", 1).mid].value == 0x87
    # Another client id on the same certificate is not the thing: no group policy.
    other = Client(mooring, client_id="not-the-thing", protocol=V5, tls_context=dev.tls())
    assert other.pubacks[other.pub("groups/a", b"other", 1).mid].value == 0x87
    other.stop()
    # Out of the group again: denied on the next publish.
    iot.remove_thing_from_thing_group(thingGroupName="tg-child", thingName="grouped-dev")
    deadline = time.time() + 10
    while c.pubacks[c.pub("groups/a", b"left", 1).mid].value != 0x87:
        assert time.time() < deadline, "the group's policy still applies"
        time.sleep(0.1)
    c.stop()
    # Memberships made before a restart apply after it.
    iot.add_thing_to_thing_group(thingGroupName="tg-child", thingName="grouped-dev")
    mooring.kill()
    mooring.start()
    c = Client(mooring, client_id="grouped-dev", protocol=V5, tls_context=dev.tls())
    deadline = time.time() + 10
    while c.pubacks[c.pub("groups/a", b"restarted", 1).mid].value != 0:
        assert time.time() < deadline, "the group's policy did not apply after a restart"
        time.sleep(0.1)
    c.stop()


def test_lifecycle_events_name_the_exclusive_thing(mooring, tmp_path):
    """A certificate attached to a thing with EXCLUSIVE_THING: every lifecycle event of its
    connections carries `thingName` (right after `clientId`); one attached NON_EXCLUSIVE_THING
    gives none."""
    iot = mooring.client("iot")
    obs = observer(mooring)
    exclusive = Device(mooring, tmp_path, policy=ALLOW_ALL)
    shared = Device(mooring, tmp_path, policy=ALLOW_ALL)
    for thing, dev, kind in (("excl-thing", exclusive, "EXCLUSIVE_THING"),
                             ("shared-thing", shared, "NON_EXCLUSIVE_THING")):
        iot.create_thing(thingName=thing)
        iot.attach_thing_principal(thingName=thing, principal=dev.arn, thingPrincipalType=kind)
    c = Client(mooring, client_id="excl-client", protocol=V5, tls_context=exclusive.tls())
    c.sub("excl/#", 1)
    c.stop()
    for topic in ("$aws/events/presence/connected/excl-client",
                  "$aws/events/subscriptions/subscribed/excl-client",
                  "$aws/events/presence/disconnected/excl-client"):
        e = event(obs.expect(topic))
        assert list(e)[:2] == ["clientId", "thingName"] and e["thingName"] == "excl-thing", (topic, e)
        assert e["principalIdentifier"] == exclusive.id
    d = Client(mooring, client_id="shared-client", protocol=V5, tls_context=shared.tls())
    d.stop()
    for topic in ("$aws/events/presence/connected/shared-client",
                  "$aws/events/presence/disconnected/shared-client"):
        e = event(obs.expect(topic))
        assert "thingName" not in e and e["principalIdentifier"] == shared.id, (topic, e)


def test_thing_principals(mooring):
    iot = mooring.client("iot")
    iot.create_thing(thingName="dev-1")
    iot.create_thing(thingName="dev-2")
    cert = iot.create_keys_and_certificate(setAsActive=True)
    iot.attach_thing_principal(thingName="dev-1", principal=cert["certificateArn"])
    cli(mooring, "iot", "attach-thing-principal", "--thing-name", "dev-2",
        "--principal", cert["certificateArn"])
    assert iot.list_thing_principals(thingName="dev-1")["principals"] == [cert["certificateArn"]]
    assert iot.list_principal_things(principal=cert["certificateArn"])["things"] == ["dev-1", "dev-2"]
    out = json.loads(cli(mooring, "iot", "list-principal-things", "--principal",
                         cert["certificateArn"]).stdout)
    assert out["things"] == ["dev-1", "dev-2"]
    # A principal attached elsewhere cannot be attached exclusively.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_thing_principal(thingName="dev-1", principal=cert["certificateArn"],
                                   thingPrincipalType="EXCLUSIVE_THING")
    assert error_of(e) == ("InvalidRequestException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.attach_thing_principal(thingName="nope", principal=cert["certificateArn"])
    assert error_of(e) == ("ResourceNotFoundException", 404)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.list_thing_principals(thingName="nope")
    assert error_of(e) == ("ResourceNotFoundException", 404)
    # Attached to a thing: the certificate cannot be deleted.
    iot.update_certificate(certificateId=cert["certificateId"], newStatus="INACTIVE")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.delete_certificate(certificateId=cert["certificateId"])
    assert error_of(e) == ("DeleteConflictException", 409)
    iot.detach_thing_principal(thingName="dev-2", principal=cert["certificateArn"])
    assert iot.list_principal_things(principal=cert["certificateArn"])["things"] == ["dev-1"]
    assert iot.list_thing_principals(thingName="dev-2")["principals"] == []
    iot.detach_thing_principal(thingName="dev-1", principal=cert["certificateArn"])
    iot.delete_certificate(certificateId=cert["certificateId"])


def test_describe_endpoint(mooring):
    iot = mooring.client("iot")
    for kind in ["iot:Data", "iot:Data-ATS", "iot:CredentialProvider", "iot:Jobs"]:
        assert iot.describe_endpoint(endpointType=kind)["endpointAddress"] == "localhost"
    assert iot.describe_endpoint()["endpointAddress"] == "localhost"
    out = json.loads(cli(mooring, "iot", "describe-endpoint", "--endpoint-type", "iot:Data-ATS").stdout)
    assert out == {"endpointAddress": "localhost"}
    with pytest.raises(botocore.exceptions.ClientError) as e:
        iot.describe_endpoint(endpointType="iot:Nope")
    assert error_of(e) == ("InvalidRequestException", 400)


def test_describe_endpoint_is_configurable(mooring_factory):
    m = mooring_factory(extra_args=["--set", "iot.security.endpoint_address=127.0.0.1"])
    assert m.client("iot").describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"] == "127.0.0.1"


# ---- enforcement on the broker -----------------------------------------------------------

def test_awsiotsdk_mtls_with_created_certificate(mooring, tmp_path):
    from awscrt import mqtt as crt_mqtt
    from awsiot import mqtt_connection_builder
    iot = mooring.client("iot")
    iot.create_thing(thingName="sdk-thing")
    dev = Device(mooring, tmp_path, policy=policy(
        {"Effect": "Allow", "Action": "iot:Connect",
         "Resource": arn(mooring, "client/${iot:Connection.Thing.ThingName}")},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
         "Resource": arn(mooring, "topic/sdk/${iot:ClientId}/*")},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": arn(mooring, "topicfilter/sdk/${iot:ClientId}/*")}))
    iot.attach_thing_principal(thingName="sdk-thing", principal=dev.arn)
    obs = observer(mooring)
    endpoint = iot.describe_endpoint(endpointType="iot:Data-ATS")["endpointAddress"]
    conn = mqtt_connection_builder.mtls_from_bytes(
        endpoint=endpoint, port=hostport(mooring.endpoints["mqtts"])[1],
        cert_bytes=dev.cert_pem.encode(), pri_key_bytes=dev.key_pem.encode(),
        ca_bytes=dev.ca_path.read_bytes(), client_id="sdk-thing", clean_session=True,
        keep_alive_secs=30)
    conn.connect().result(15)
    connected = event(obs.expect("$aws/events/presence/connected/sdk-thing"))
    assert connected["principalIdentifier"] == dev.id
    received = []
    sub, _ = conn.subscribe("sdk/sdk-thing/#", crt_mqtt.QoS.AT_LEAST_ONCE,
                            lambda topic, payload, **kw: received.append((topic, payload)))
    assert sub.result(10)["qos"] == crt_mqtt.QoS.AT_LEAST_ONCE
    pub, _ = conn.publish("sdk/sdk-thing/temp", b'{"t": 21}', crt_mqtt.QoS.AT_LEAST_ONCE)
    pub.result(10)
    deadline = time.time() + 10
    while not received and time.time() < deadline:
        time.sleep(0.05)
    assert received == [("sdk/sdk-thing/temp", b'{"t": 21}')]
    conn.disconnect().result(10)

    # Not attached to the thing "other-id" names: the thing variable does not resolve.
    bad = mqtt_connection_builder.mtls_from_bytes(
        endpoint=endpoint, port=hostport(mooring.endpoints["mqtts"])[1],
        cert_bytes=dev.cert_pem.encode(), pri_key_bytes=dev.key_pem.encode(),
        ca_bytes=dev.ca_path.read_bytes(), client_id="other-id", clean_session=True)
    with pytest.raises(Exception):
        bad.connect().result(15)
    failed = event(obs.expect("$aws/events/presence/connect_failed/other-id"))
    assert failed["connectFailureReason"] == "AUTHORIZATION_FAILED"
    assert failed["principalIdentifier"] == dev.id


def test_policy_denials_on_the_broker(mooring, tmp_path):
    dev = Device(mooring, tmp_path, policy=policy(
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": arn(mooring, "client/ok-*")},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive", "iot:Subscribe"], "Resource": "*"},
        {"Effect": "Deny", "Action": "iot:Publish", "Resource": arn(mooring, "topic/forbidden/*")},
        {"Effect": "Deny", "Action": "iot:Subscribe", "Resource": arn(mooring, "topicfilter/secret/#")},
        {"Effect": "Deny", "Action": "iot:Receive", "Resource": arn(mooring, "topic/hidden")}))
    obs = observer(mooring)

    # Connect denied by the client-id resource: CONNACK 0x87 (v5) / 5 (3.1.1), connect_failed.
    refused5 = Client(mooring, client_id="nope-5", protocol=V5, tls_context=dev.tls(), connect=False)
    refused5.connect(expect_ok=False)
    assert refused5.connack_rc.value == 0x87
    refused3 = Client(mooring, client_id="nope-3", tls_context=dev.tls(), connect=False)
    refused3.connect(expect_ok=False)
    assert refused3.connack_rc.value == 0x87  # paho reports 3.1.1's return code 5 as 0x87
    for cid in ("nope-5", "nope-3"):
        f = event(obs.expect(f"$aws/events/presence/connect_failed/{cid}"))
        assert f["connectFailureReason"] == "AUTHORIZATION_FAILED" and f["principalIdentifier"] == dev.id

    # MQTT 5: a denied QoS 1 publish gets PUBACK 0x87 and the connection stays up.
    c5 = Client(mooring, client_id="ok-5", protocol=V5, tls_context=dev.tls())
    info = c5.pub("forbidden/x", b"no", 1)
    assert c5.pubacks[info.mid].value == 0x87
    # Subscribe denied: SUBACK 0x87 for that filter only.
    rcs = c5.sub("secret/#", 1)
    assert [rc.value for rc in rcs] == [0x87]
    assert [rc.value for rc in c5.sub("open/#", 1)] == [1]
    c5.sub("hidden", 1)
    plain = Client(mooring)
    plain.pub("open/a", b"visible", 1)
    assert c5.expect("open/a").payload == b"visible"
    plain.pub("hidden", b"dropped", 1)  # iot:Receive denied: silently not delivered
    c5.nothing()

    # MQTT 3.1.1: subscribe denied is SUBACK 0x80; a denied publish disconnects the client.
    c3 = Client(mooring, client_id="ok-3", tls_context=dev.tls())
    assert [getattr(r, "value", r) for r in c3.sub("secret/#", 1)] == [0x80]
    c3.pub("forbidden/y", b"no", 1, wait=False)
    assert c3.disconnects.get(timeout=10) is not None
    d = event(obs.expect("$aws/events/presence/disconnected/ok-3"))
    assert d["disconnectReason"] == "AUTH_ERROR" and d["clientInitiatedDisconnect"] is False


def test_unknown_or_inactive_certificate_is_refused(mooring, tmp_path):
    dev = Device(mooring, tmp_path, active=False, policy=ALLOW_ALL)
    obs = observer(mooring)
    c = Client(mooring, client_id="inactive-dev", protocol=V5, tls_context=dev.tls(), connect=False)
    c.connect(expect_ok=False)
    assert c.connack_rc.value == 0x87
    assert event(obs.expect("$aws/events/presence/connect_failed/inactive-dev"))["eventType"] == "connect_failed"
    mooring.client("iot").update_certificate(certificateId=dev.id, newStatus="ACTIVE")
    Client(mooring, client_id="inactive-dev", protocol=V5, tls_context=dev.tls())


def test_deactivating_a_certificate_drops_its_live_connection(mooring, tmp_path):
    dev = Device(mooring, tmp_path, policy=ALLOW_ALL)
    obs = observer(mooring)
    c = Client(mooring, client_id="live-dev", tls_context=dev.tls())
    event(obs.expect("$aws/events/presence/connected/live-dev"))
    mooring.client("iot").update_certificate(certificateId=dev.id, newStatus="INACTIVE")
    assert c.disconnects.get(timeout=10) is not None
    d = event(obs.expect("$aws/events/presence/disconnected/live-dev"))
    assert d["disconnectReason"] == "AUTH_ERROR"
    c.c.loop_stop()
    again = Client(mooring, client_id="live-dev", tls_context=dev.tls(), connect=False)
    again.connect(expect_ok=False)
    assert again.connack_rc.value == 0x87  # 3.1.1 return code 5, as paho reports it
    # Revoked: same, and it cannot come back.
    iot = mooring.client("iot")
    iot.update_certificate(certificateId=dev.id, newStatus="ACTIVE")
    c2 = Client(mooring, client_id="live-dev", protocol=V5, tls_context=dev.tls())
    iot.update_certificate(certificateId=dev.id, newStatus="REVOKED")
    assert c2.disconnects.get(timeout=10) is not None


def test_anonymous_policy_is_configurable(mooring_factory):
    anon = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["iot:Connect", "iot:Subscribe", "iot:Receive"], "Resource": "*"},
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/public/*"}]})
    m = mooring_factory(extra_args=["--set", f"iot.security.anonymous_policy={anon}"])
    c = Client(m, protocol=V5)
    c.sub("public/#", 1)
    c.pub("public/a", b"ok", 1)
    assert c.expect("public/a").payload == b"ok"
    info = c.pub("private/a", b"no", 1)
    assert c.pubacks[info.mid].value == 0x87


# ---- iot-data ------------------------------------------------------------------------------

def test_iot_data_publish_reaches_subscribers(mooring):
    data = mooring.client("iot-data")
    sub = Client(mooring, protocol=V5)
    sub.sub("http/+/in", 1)
    r = data.publish(topic="http/dev 1/in", qos=1, payload=b'{"v":1}',
                     userProperties=json.dumps([{"a": "1"}, {"b": "2"}]),
                     payloadFormatIndicator="UTF8_DATA", contentType="application/json",
                     responseTopic="http/reply", correlationData=base64.b64encode(b"corr").decode(),
                     messageExpiry=60)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    msg = sub.expect("http/dev 1/in")
    assert msg.payload == b'{"v":1}' and msg.qos == 1
    p = msg.properties
    assert p.UserProperty == [("a", "1"), ("b", "2")]
    assert p.PayloadFormatIndicator == 1 and p.ContentType == "application/json"
    assert p.ResponseTopic == "http/reply" and p.CorrelationData == b"corr"
    assert 0 < p.MessageExpiryInterval <= 60

    out = cli(mooring, "iot-data", "publish", "--topic", "http/cli/in", "--qos", "1",
              "--payload", '{"from":"cli"}')  # AWS CLI v1: blob arguments are raw
    assert sub.expect("http/cli/in").payload == b'{"from":"cli"}', out.stderr

    for kwargs, code in [({"topic": "a/+/b"}, 400), ({"topic": "ok", "qos": 2}, 400),
                         ({"topic": "$aws/events/presence/x"}, 400),
                         ({"topic": "big", "payload": b"x" * (128 * 1024 + 1)}, 400)]:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            data.publish(**kwargs)
        assert error_of(e) == ("InvalidRequestException", code), kwargs


def test_iot_data_throttling(mooring_factory):
    from concurrent.futures import ThreadPoolExecutor
    m = mooring_factory(extra_args=["--set", "iot.data.publish_per_second=1"])
    data = m.client("iot-data")

    def one(_):
        try:
            data.publish(topic="t/throttle", payload=b"x")
            return 200
        except botocore.exceptions.ClientError as e:
            return (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(8)))
    assert ("ThrottlingException", 429) in codes and 200 in codes, codes


def test_retained_messages_over_http(mooring):
    data = mooring.client("iot-data")
    before = int(time.time() * 1000)
    data.publish(topic="ret/a", payload=b"alpha", retain=True, qos=1,
                 userProperties=json.dumps([{"k": "v"}]))
    paho = Client(mooring)
    paho.pub("ret/b", b"bravo-bravo", 0, retain=True)
    time.sleep(0.3)
    r = data.get_retained_message(topic="ret/a")
    assert r["topic"] == "ret/a" and r["payload"] == b"alpha" and r["qos"] == 1
    assert before <= r["lastModifiedTime"] <= int(time.time() * 1000)
    assert json.loads(r["userProperties"]) == [{"k": "v"}]
    listed = data.list_retained_messages()["retainedTopics"]
    assert [(t["topic"], t["payloadSize"], t["qos"]) for t in listed] == [
        ("ret/a", 5, 1), ("ret/b", 11, 0)]
    assert all(t["lastModifiedTime"] >= before for t in listed)
    page = data.list_retained_messages(maxResults=1)
    assert len(page["retainedTopics"]) == 1 and page["nextToken"]
    assert data.list_retained_messages(nextToken=page["nextToken"])["retainedTopics"][0]["topic"] == "ret/b"
    # A subscriber to the exact topic receives it.
    s = Client(mooring)
    s.sub("ret/a", 1)
    assert s.expect("ret/a").payload == b"alpha"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        data.get_retained_message(topic="ret/none")
    assert error_of(e) == ("ResourceNotFoundException", 404)
    out = json.loads(cli(mooring, "iot-data", "list-retained-messages").stdout)
    assert [t["topic"] for t in out["retainedTopics"]] == ["ret/a", "ret/b"]
    data.publish(topic="ret/a", payload=b"", retain=True)
    time.sleep(0.2)
    assert [t["topic"] for t in data.list_retained_messages()["retainedTopics"]] == ["ret/b"]


# ---- durability ----------------------------------------------------------------------------

def test_security_state_survives_sigkill(mooring, tmp_path):
    iot = mooring.client("iot")
    iot.create_thing(thingName="durable")
    dev = Device(mooring, tmp_path, policy=ALLOW_ALL)
    iot.attach_thing_principal(thingName="durable", principal=dev.arn)
    inactive = iot.create_keys_and_certificate()["certificateId"]
    mooring.kill()
    mooring.start()
    iot = mooring.client("iot")
    assert iot.describe_certificate(certificateId=dev.id)["certificateDescription"]["status"] == "ACTIVE"
    assert iot.describe_certificate(certificateId=inactive)["certificateDescription"]["status"] == "INACTIVE"
    assert iot.get_policy(policyName=dev.policy_name)["policyDocument"] == ALLOW_ALL
    assert [p["policyName"] for p in iot.list_attached_policies(target=dev.arn)["policies"]] == [dev.policy_name]
    assert iot.list_thing_principals(thingName="durable")["principals"] == [dev.arn]
    c = Client(mooring, client_id="durable", protocol=V5, tls_context=dev.tls())
    c.sub("durable/t", 1)
    c.pub("durable/t", b"after restart", 1)
    assert c.expect("durable/t").payload == b"after restart"
