"""MQTT topic names and topic filters: validation and matching (MQTT 5 section 4.7).

The memory broker uses these rules so that the in-process transport routes exactly as
Mosquitto would; a subscription that works in tests but not on a real broker would hide
configuration bugs. Rules implemented:

- levels are separated by `/`; empty levels are legal (`/a`, `a//b`);
- `+` matches exactly one level and must occupy a whole level;
- `#` matches the parent level and any number of child levels, and must be the last,
  whole level;
- topics starting with `$` (e.g. `$SYS/...`) are not matched by a filter whose first
  level is a wildcard;
- `$share/<group>/<filter>` is a shared subscription: the prefix names the group and is
  not part of the filter that is matched.
"""

from __future__ import annotations

SHARE_PREFIX = "$share/"
MAX_TOPIC_BYTES = 65_535  # an MQTT UTF-8 string's length prefix is two bytes


def validate_topic(topic: str) -> None:
    """Raise ValueError unless `topic` is a legal topic *name* (what one publishes to)."""
    if not topic:
        raise ValueError("topic name must not be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic name must not contain wildcards: {topic!r}")
    if "\x00" in topic:
        raise ValueError("topic name must not contain NUL")
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic name over {MAX_TOPIC_BYTES} UTF-8 bytes")


def validate_publish_topic(topic: str) -> None:
    """`validate_topic`, and not a `$`-topic: what a client may publish to."""
    validate_topic(topic)
    if topic.startswith("$"):
        raise ValueError(f"topic name must not start with '$': {topic[:80]!r}")


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError unless `topic_filter` is a legal plain filter (no `$share/`)."""
    if not topic_filter:
        raise ValueError("topic filter must not be empty")
    if "\x00" in topic_filter:
        raise ValueError("topic filter must not contain NUL")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")


def split_shared(subscription: str) -> tuple[str | None, str]:
    """Split `$share/<group>/<filter>` into `(group, filter)`; plain filters give `(None, f)`.

    The filter part is validated, as is the group name (non-empty, no `/`, `+` or `#`).
    """
    if not subscription.startswith(SHARE_PREFIX):
        validate_filter(subscription)
        return None, subscription
    group, sep, topic_filter = subscription[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or "+" in group or "#" in group:
        raise ValueError(f"malformed shared subscription: {subscription!r}")
    validate_filter(topic_filter)
    return group, topic_filter


def shared(group: str, topic_filter: str) -> str:
    """The `$share/<group>/<filter>` form of a plain filter (validated)."""
    result = f"{SHARE_PREFIX}{group}/{topic_filter}"
    split_shared(result)
    return result


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` (a topic name) matches `topic_filter` (plain or `$share/...`)."""
    _, plain = split_shared(topic_filter)
    filter_levels = plain.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            # `a/#` also matches `a` itself: the parent level.
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)
