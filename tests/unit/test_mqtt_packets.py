"""The MQTT transport's packet codec: what it writes parses back, a stream split anywhere
parses the same, and bytes that are not a packet raise MalformedPacket (never anything
else) so the connection drops instead of the worker."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_worker.transports import mqtt_packets as p


def _publish(**kw: object) -> bytes:
    args: dict[str, object] = {
        "qos": 1,
        "packet_id": 7,
        "retain": False,
        "response_topic": None,
        "correlation": None,
        "user_properties": (),
    }
    args.update(kw)
    return p.publish_packet("request_message/digits", b"\x28\xb5\x2f\xfd" * 50, **args)  # type: ignore[arg-type]


def test_a_publish_with_properties_parses_back() -> None:
    packet = _publish(
        response_topic="response_message/app",
        correlation=b"\x00\x01",
        user_properties=[("traceparent", "00-abc-01"), ("k", "v")],
    )
    (msg,) = p.Reader().feed(packet)
    assert isinstance(msg, p.Message)
    assert msg.topic == b"request_message/digits" and msg.qos == 1 and msg.packet_id == 7
    assert msg.payload == b"\x28\xb5\x2f\xfd" * 50
    assert msg.response_topic == "response_message/app" and msg.correlation == b"\x00\x01"
    assert msg.user_properties == (("traceparent", "00-abc-01"), ("k", "v"))


def test_qos0_has_no_packet_id_and_retain_and_dup_are_flags() -> None:
    (msg,) = p.Reader().feed(_publish(qos=0, packet_id=0))
    assert isinstance(msg, p.Message) and msg.qos == 0 and msg.packet_id == 0
    retained = _publish(retain=True)
    assert retained[0] & 0x01
    assert p.as_duplicate(retained)[0] & 0x08 and p.as_duplicate(retained)[1:] == retained[1:]


@given(st.lists(st.integers(min_value=1, max_value=400), max_size=30))
@settings(max_examples=50, deadline=None)
def test_a_stream_split_anywhere_parses_the_same(cuts: list[int]) -> None:
    stream = b"".join(_publish(packet_id=i + 1) for i in range(5)) + b"\xd0\x00"
    reader, got, at = p.Reader(), [], 0
    for cut in cuts:
        got += reader.feed(stream[at : at + cut])
        at += cut
    got += reader.feed(stream[at:])
    assert [m.packet_id for m in got if isinstance(m, p.Message)] == [1, 2, 3, 4, 5]
    assert got[-1] is None  # the PINGRESP


def test_acks_parse() -> None:
    props = bytes((p.RECEIVE_MAXIMUM,)) + struct.pack("!H", 20)
    connack = b"\x20" + bytes((3 + len(props),)) + b"\x01\x00" + bytes((len(props),)) + props
    suback = b"\x90\x05\x00\x2a\x00\x01\x87"
    puback = b"\x40\x04\x00\x09\x10\x00"
    got = p.Reader().feed(connack + suback + puback + p.puback_packet(3))
    kinds = [a.kind for a in got if isinstance(a, p.Ack)]
    assert kinds == [p.CONNACK, p.SUBACK, p.PUBACK, p.PUBACK]
    ack, sub, pub, short = got
    assert isinstance(ack, p.Ack) and ack.session_present and ack.receive_maximum == 20
    assert isinstance(sub, p.Ack) and sub.packet_id == 42 and sub.reasons == (1, 0x87)
    assert isinstance(pub, p.Ack) and pub.reasons == (0x10,) and not p.is_failure(0x10)
    assert isinstance(short, p.Ack) and short.packet_id == 3 and short.reasons == (0,)
    assert p.reason_name(0x87) == "Not authorized" and p.is_failure(0x87)


def test_connect_carries_credentials_and_session_expiry() -> None:
    packet = p.connect_packet(
        "w-1",
        keepalive_s=30,
        clean_start=False,
        receive_maximum=256,
        session_expiry_s=600,
        username="iw",
        password="secret",
    )
    assert packet[0] == 0x10
    body = packet[2:]
    assert body[:7] == b"\x00\x04MQTT\x05"
    assert body[7] == 0xC0  # user name + password, clean start off
    assert struct.pack("!I", 600) in body and body.endswith(b"\x00\x06secret")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x60\x02\x00\x01",  # PUBREL: not a packet this client takes
        b"\x34\x05\x00\x01a\x00\x01",  # QoS 2 PUBLISH
        b"\x30\x01\x00",  # topic length beyond the packet
        b"\x32\x06\x00\x01a\x00\x01\x05",  # property length beyond the packet
        b"\x30\x06\x00\x01a\x02\x7f\x00",  # an unknown property
        b"\x30\xff\xff\xff\xff\x01",  # remaining length over 4 bytes
    ],
)
def test_bytes_that_are_not_a_packet_raise_malformed(raw: bytes) -> None:
    with pytest.raises(p.MalformedPacket):
        p.Reader().feed(raw)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise_anything_but_malformed(raw: bytes) -> None:
    with contextlib.suppress(p.MalformedPacket):
        p.Reader().feed(raw)
