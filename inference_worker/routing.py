"""Where a request may come from and where its response may go.

Pure functions over topic strings: the app segment of `request_message/<model>/<app>`
is authoritative (a broker ACL binds it to the publisher), and a reply topic must match
one of the configured filters, so a client cannot make the worker publish into `$SYS`,
a wildcard, or another app's topic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class ReplyPolicy:
    """`broker.reply_to_allowed` compiled once, plus the transport's own name rules.

    The common patterns are answered without walking topic levels: a plain topic is a
    set lookup, `prefix/{app}/#` a prefix test; anything else falls back to
    `check_reply_topic`. `transport_check` (Transport.check_topic) refuses names the
    broker itself would refuse (too long for MQTT, illegal for Kafka), so an answer is
    never addressed to a topic that cannot be published. Accepted (topic, app) pairs are
    remembered (a few thousand; clients reuse their reply topics), so the common case is
    one dict lookup per request.
    """

    _REMEMBERED = 4096

    def __init__(
        self, allowed: Sequence[str], transport_check: Callable[[str], None] | None = None
    ) -> None:
        self._allowed = tuple(allowed)
        self._plain = frozenset(p for p in allowed if not _has_wildcards(p))
        self._app_trees: list[str] = []  # "prefix/" of "prefix/{app}/#"
        self._general: list[str] = []
        for p in allowed:
            if p in self._plain:
                continue
            head, sep, tail = p.partition("{app}")
            if sep and tail == "/#" and not _has_wildcards(head) and "{app}" not in head:
                self._app_trees.append(head)
            else:
                self._general.append(p)
        self._transport_check = transport_check
        self._accepted: set[tuple[str, str]] = set()

    def check(self, topic: str, *, app: str) -> str:
        """`topic` if an answer for `app` may go there; else raise BAD_REQUEST."""
        if (topic, app) in self._accepted:
            return topic
        if not topic or _has_wildcards(topic) or topic.startswith("$") or "\x00" in topic:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"reply topic {topic!r} is not allowed")
        if not self._matches(topic, app):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"reply topic {topic!r} is not allowed (allowed: {', '.join(self._allowed)})",
            )
        if self._transport_check is not None:
            try:
                self._transport_check(topic)
            except ValueError as exc:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"reply topic cannot be published: {exc}"
                ) from None
        if len(self._accepted) >= self._REMEMBERED:
            self._accepted.clear()
        self._accepted.add((topic, app))
        return topic

    def _matches(self, topic: str, app: str) -> bool:
        if topic in self._plain:
            return True
        level = app or "_"
        if self._app_trees and not any(c in level for c in "/+#\x00") and level[0] != "$":
            for head in self._app_trees:
                stem = head + level
                if topic == stem or topic.startswith(stem + "/"):
                    return True
        if self._general:
            try:
                check_reply_topic(topic, self._general, app=app)
            except ProtocolError:
                return False
            return True
        return False


def _has_wildcards(topic: str) -> bool:
    return "+" in topic or "#" in topic
