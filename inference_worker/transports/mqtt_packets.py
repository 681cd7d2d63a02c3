"""MQTT 5 packets: the few the transport sends and receives, as bytes in and out.

Why not paho's packet code: paho reads a packet with one `recv()` per header byte and
builds a `MQTTMessage` and a `Properties` object per PUBLISH; in a profile of the
worker that was about a quarter of the event loop's time. Here a whole socket read is
parsed in one pass over a buffer, and a PUBLISH becomes one small frozen record.

Scope (the transport is a client of QoS 0/1 subscriptions and publishes): CONNECT,
SUBSCRIBE, PUBLISH, PUBACK, PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH,
PUBACK, PINGRESP and DISCONNECT in. Anything else from the broker, or a malformed
packet, raises `MalformedPacket`, and the connection is dropped (the spec's answer to a
protocol error). No I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from inference_worker_client.frozen import quick_init

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 9, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# Property identifiers (MQTT 5.0 section 2.2.2.2) and how each value is encoded.
RESPONSE_TOPIC, CORRELATION_DATA, USER_PROPERTY = 0x08, 0x09, 0x26
SESSION_EXPIRY, RECEIVE_MAXIMUM, REASON_STRING = 0x11, 0x21, 0x1F
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _UTF8, 0x13: _TWO, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip

# Reason code names as the spec spells them (section 2.4), for error messages.
REASONS = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2", 0x04: "Disconnect with Will",
    0x10: "No matching subscribers", 0x80: "Unspecified error", 0x81: "Malformed Packet",
    0x82: "Protocol Error", 0x83: "Implementation specific error",
    0x84: "Unsupported Protocol Version", 0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password", 0x87: "Not authorized", 0x88: "Server unavailable",
    0x89: "Server busy", 0x8A: "Banned", 0x8B: "Server shutting down",
    0x8C: "Bad authentication method", 0x8D: "Keep Alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x93: "Receive Maximum exceeded", 0x94: "Topic Alias invalid", 0x95: "Packet too large",
    0x96: "Message rate too high", 0x97: "Quota exceeded", 0x98: "Administrative action",
    0x99: "Payload format invalid", 0x9A: "Retain not supported", 0x9B: "QoS not supported",
    0x9C: "Use another server", 0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported", 0x9F: "Connection rate exceeded",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}  # fmt: skip


class MalformedPacket(ConnectionError):
    """The broker sent bytes that are not a packet this client can take."""


def reason_name(code: int) -> str:
    return REASONS.get(code, f"reason code 0x{code:02x}")


def is_failure(code: int) -> bool:
    return code >= 0x80


@quick_init
@dataclass(frozen=True, slots=True)
class Message:
    """One PUBLISH from the broker. `topic` is raw bytes: checking UTF-8 is the
    caller's (a broker should, but a bad one must not crash the parser)."""

    topic: bytes
    payload: bytes
    qos: int
    packet_id: int
    response_topic: str | None = None
    correlation: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@quick_init
@dataclass(frozen=True, slots=True)
class Ack:
    """A CONNACK, SUBACK, PUBACK or DISCONNECT from the broker: its packet id (0 where
    the packet has none), reason codes, and the properties the transport reads."""

    kind: int
    packet_id: int
    reasons: tuple[int, ...]
    session_present: bool = False
    receive_maximum: int = 65535
    reason_string: str | None = None


# --- encoding ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int,
    clean_start: bool,
    receive_maximum: int,
    session_expiry_s: int,
    username: str | None,
    password: str | None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props = bytes((RECEIVE_MAXIMUM,)) + struct.pack("!H", receive_maximum)
    if session_expiry_s > 0:
        props += bytes((SESSION_EXPIRY,)) + struct.pack("!I", session_expiry_s)
    body = _utf8("MQTT") + bytes((5, flags)) + struct.pack("!H", keepalive_s)
    body += _varint(len(props)) + props + _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _binary(password.encode("utf-8"))
    return _packet(0x10, body)


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic_filter in filters:
        body += _utf8(topic_filter) + bytes((qos,))
    return _packet(0x82, body)


def publish_packet(
    topic: str,
    payload: bytes,
    *,
    qos: int,
    packet_id: int,
    retain: bool,
    response_topic: str | None,
    correlation: bytes | None,
    user_properties: Sequence[tuple[str, str]],
) -> bytes:
    """A PUBLISH (first attempt: DUP clear; see `as_duplicate`)."""
    props = b""
    if response_topic is not None:
        props += bytes((RESPONSE_TOPIC,)) + _utf8(response_topic)
    if correlation is not None:
        props += bytes((CORRELATION_DATA,)) + _binary(bytes(correlation))
    for key, value in user_properties:
        props += bytes((USER_PROPERTY,)) + _utf8(key) + _utf8(value)
    head = _utf8(topic)
    if qos:
        head += struct.pack("!H", packet_id)
    head += _varint(len(props)) + props
    first = 0x30 | (qos << 1) | (1 if retain else 0)
    return bytes((first,)) + _varint(len(head) + len(payload)) + head + payload


def as_duplicate(packet: bytes) -> bytes:
    """The same PUBLISH with DUP set, for a resend after a reconnect."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


def puback_packet(packet_id: int) -> bytes:
    # Remaining length 2: reason code 0 (Success) and no properties may be left out.
    return b"\x40\x02" + struct.pack("!H", packet_id)


# --- decoding ------------------------------------------------------------------------


class Reader:
    """Splits the byte stream into packets; keeps a partial packet for the next feed."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[Message | Ack | None]:
        """Each complete packet in `data` (after what was left over): a `Message`, an
        `Ack`, or None for a PINGRESP. Raises MalformedPacket."""
        if self._rest:
            data = self._rest + data
        packets: list[Message | Ack | None] = []
        pos, end = 0, len(data)
        while end - pos >= 2:
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < end:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise MalformedPacket("remaining length over 4 bytes")
            if not complete or end - i < length:
                break
            packets.append(_parse(data[pos], data[i : i + length]))
            pos = i + length
        self._rest = data[pos:]
        return packets


def _parse(first: int, body: bytes) -> Message | Ack | None:
    kind = first >> 4
    try:
        if kind == PUBLISH:
            return _publish(first, body)
        if kind == PUBACK:
            packet_id = struct.unpack_from("!H", body)[0]
            return Ack(PUBACK, packet_id, (body[2] if len(body) > 2 else 0,))
        if kind == CONNACK:
            props = _properties(body, 2)[0]
            return Ack(
                CONNACK,
                0,
                (body[1],),
                session_present=bool(body[0] & 1),
                receive_maximum=int(props.get(RECEIVE_MAXIMUM, 65535)) or 65535,  # type: ignore[call-overload]
                reason_string=_text(props.get(REASON_STRING)),
            )
        if kind == SUBACK:
            packet_id = struct.unpack_from("!H", body)[0]
            _, at = _properties(body, 2)
            return Ack(SUBACK, packet_id, tuple(body[at:]))
        if kind == PINGRESP:
            return None
        if kind == DISCONNECT:
            code = body[0] if body else 0
            props = _properties(body, 1)[0] if len(body) > 1 else {}
            return Ack(DISCONNECT, 0, (code,), reason_string=_text(props.get(REASON_STRING)))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise MalformedPacket(f"malformed packet of type {kind}: {exc}") from exc
    raise MalformedPacket(f"unexpected packet type {kind} from the broker")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _publish(first: int, body: bytes) -> Message:
    qos = (first >> 1) & 3
    if qos > 1:
        raise MalformedPacket("QoS 2 PUBLISH on a QoS 1 subscription")
    (topic_len,) = struct.unpack_from("!H", body)
    at = 2 + topic_len
    topic = body[2:at]
    packet_id = 0
    if qos:
        (packet_id,) = struct.unpack_from("!H", body, at)
        at += 2
    if body[at] == 0:  # no properties: the common case
        return Message(topic, body[at + 1 :], qos, packet_id)
    props, at = _properties(body, at)
    response = props.get(RESPONSE_TOPIC)
    correlation = props.get(CORRELATION_DATA)
    pairs = props.get(USER_PROPERTY, ())
    return Message(
        topic,
        body[at:],
        qos,
        packet_id,
        response_topic=response if isinstance(response, str) else None,
        correlation=correlation if isinstance(correlation, bytes) else None,
        user_properties=tuple(pairs) if isinstance(pairs, list) else (),
    )


def _properties(body: bytes, at: int) -> tuple[dict[int, object], int]:
    """The property block at `at`: {identifier: value} (user properties as a list of
    pairs) and the offset after it."""
    length, shift = 0, 0
    while True:
        byte = body[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    end = at + length
    if end > len(body):
        raise MalformedPacket("property length beyond the packet")
    props: dict[int, object] = {}
    while at < end:
        ident = body[at]
        at += 1
        kind = _PROPERTY_KINDS.get(ident)
        value: object
        if kind == _BYTE:
            value, at = body[at], at + 1
        elif kind == _TWO:
            value, at = struct.unpack_from("!H", body, at)[0], at + 2
        elif kind == _FOUR:
            value, at = struct.unpack_from("!I", body, at)[0], at + 4
        elif kind == _VARINT:
            value, shift = 0, 0
            while True:
                byte = body[at]
                at += 1
                value |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
        elif kind in (_UTF8, _BINARY):
            (n,) = struct.unpack_from("!H", body, at)
            raw = body[at + 2 : at + 2 + n]
            at += 2 + n
            value = raw.decode("utf-8") if kind == _UTF8 else raw
        elif kind == _PAIR:
            (n,) = struct.unpack_from("!H", body, at)
            key = body[at + 2 : at + 2 + n].decode("utf-8", "replace")
            at += 2 + n
            (n,) = struct.unpack_from("!H", body, at)
            val = body[at + 2 : at + 2 + n].decode("utf-8", "replace")
            at += 2 + n
            pairs = props.setdefault(USER_PROPERTY, [])
            assert isinstance(pairs, list)
            pairs.append((key, val))
            continue
        else:
            raise MalformedPacket(f"unknown property 0x{ident:02x}")
        props[ident] = value
    if at != end:
        raise MalformedPacket("property block overruns its length")
    return props, end
