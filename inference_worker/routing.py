"""Where a request may come from and where its response may go.

Pure functions over topic strings: the app segment of `request_message/<model>/<app>`
is authoritative (a broker ACL binds it to the publisher), and a reply topic must match
one of the configured filters, so a client cannot make the worker publish into `$SYS`,
a wildcard, or another app's topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_worker.protocol import ErrorCode, ProtocolError
from inference_worker.transports.topics import matches as topic_matches


@dataclass(frozen=True)
class TopicRoute:
    model: str | None
    app: str | None


def parse_request_topic(request_topic: str, topic: str) -> TopicRoute:
    """`request_message` → no constraint; `request_message/<model>[/<app>]` → both named."""
    if topic == request_topic or not topic.startswith(request_topic + "/"):
        return TopicRoute(None, None)
    parts = topic[len(request_topic) + 1 :].split("/")
    model = parts[0] or None
    app = parts[1] if len(parts) > 1 and parts[1] else None
    return TopicRoute(model, app)


def check_reply_topic(topic: str, allowed: Sequence[str], *, app: str) -> str:
    """Return `topic` if a response may be published there, else raise BAD_REQUEST.

    `{app}` in an allowed filter stands for the request's (authoritative) app.
    """
    if not topic or "+" in topic or "#" in topic or topic.startswith("$") or "\x00" in topic:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"reply topic {topic!r} is not allowed")
    # `{app}` is substituted into a topic filter: an app that is not one plain topic level
    # (`#`, `+`, `a/b`, `$x`) would widen the pattern, so it matches no `{app}` pattern.
    level = app or "_"
    plain_level = not any(c in level for c in "/+#\x00") and not level.startswith("$")
    for pattern in allowed:
        if "{app}" in pattern and not plain_level:
            continue
        if topic_matches(pattern.replace("{app}", level), topic):
            return topic
    raise ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"reply topic {topic!r} is not allowed (allowed: {', '.join(allowed)})",
    )
