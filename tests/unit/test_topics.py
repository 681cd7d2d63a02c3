"""MQTT topic-filter rules used by the memory broker (MQTT 5 section 4.7)."""

from __future__ import annotations

import pytest

from inference_worker.protocol import ProtocolError
from inference_worker.routing import check_reply_topic
from inference_worker.transports.topics import (
    matches,
    shared,
    split_shared,
    validate_filter,
    validate_topic,
)


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("request_message", "request_message"),
        ("request_message/#", "request_message/digits/app1"),
        ("request_message/#", "request_message"),  # '#' includes the parent level
        ("request_message/+/app1", "request_message/digits/app1"),
        ("#", "a/b/c"),
        ("+", "a"),
        ("+/+", "/finance"),  # empty levels are levels
        ("/+", "/finance"),
        ("a//b", "a//b"),
        ("a/+/b", "a//b"),
        ("$SYS/#", "$SYS/broker/load"),
        ("$share/g/request_message/#", "request_message/digits"),
    ],
)
def test_matches(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("request_message", "request_message/digits"),
        ("request_message/+", "request_message"),
        ("request_message/+", "request_message/a/b"),
        ("a/b", "a/c"),
        ("+", "a/b"),
        ("+", "/a"),
        ("#", "$SYS/broker"),  # leading wildcards never match $-topics
        ("+/broker", "$SYS/broker"),
        ("$share/g/#", "$SYS/broker"),
        ("Request_message", "request_message"),  # case-sensitive
    ],
)
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not matches(topic_filter, topic)


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b#", "a+", "a/+b", "a\x00b"])
def test_invalid_filters(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\x00"])
def test_invalid_topics(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_topic(bad)


def test_split_shared() -> None:
    assert split_shared("$share/workers/request_message/#") == ("workers", "request_message/#")
    assert split_shared("request_message") == (None, "request_message")
    assert shared("workers", "request_message") == "$share/workers/request_message"


@pytest.mark.parametrize(
    "bad", ["$share/", "$share/g", "$share//a", "$share/g+/a", "$share/g/", "$share/g/a#"]
)
def test_malformed_shared(bad: str) -> None:
    with pytest.raises(ValueError):
        split_shared(bad)


@pytest.mark.parametrize("app", ["#", "+", "a/b", "$SYS"])
def test_an_app_that_is_not_one_topic_level_cannot_widen_a_reply_pattern(app: str) -> None:
    allowed = ("response_message", "response_message/{app}/#")
    with pytest.raises(ProtocolError):
        check_reply_topic("response_message/victim/inbox", allowed, app=app)
    assert check_reply_topic("response_message", allowed, app=app) == "response_message"
    assert check_reply_topic("response_message/ok/x", allowed, app="ok") == "response_message/ok/x"
    assert check_reply_topic("response_message/_/x", allowed, app="") == "response_message/_/x"
