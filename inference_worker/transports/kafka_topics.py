"""Kafka topic names for the worker's MQTT-style names: a mapping that is one-to-one.

Kafka topics are `[A-Za-z0-9._-]{1,249}` and cannot hold `/`, so `/` maps to `.`:
MQTT-side `request_message/digits` is Kafka `request_message.digits`. For that to be
reversible a `.` must never come from inside a level, so a name maps out only if

- every level is non-empty and `[A-Za-z0-9_-]+` (no `.`, no empty level such as `a//b`);
- except the dead-letter suffix: the last level may end in `.dlq` (`request_message.dlq`
  stays `request_message.dlq`), and so, when there is more than one level, the last level
  may not be `dlq` itself (`a/dlq` would collide with `a.dlq`);
- it does not start with `__` (Kafka's internal topics) and is at most 249 characters.

On the way in a Kafka name splits at `.`, a last level `dlq` rejoins the level before it
(`a.b.dlq` → `a/b.dlq`), and the result must satisfy the same rules; a Kafka name that no
MQTT-side name maps to (`a..b`, `.a`, `__x`) raises ValueError. Both directions are exact
inverses, so an app named `a.b` is refused when mapping out instead of being read back as
`a/b`. A wildcard filter becomes a regex subscription: `+` is one level, `a/#` is
`^a([.].*)?$`. Patterns never match a last level `dlq`: MQTT `request_message/#` does not
match `request_message.dlq`, and a worker must not take its own dead letters for requests.

Both mappings run per record (request topic, reply topic) and cost 2-3 % of the worker's
CPU at full load (profiled), so their answers are kept, a bounded number of them: a
fleet of devices each with its own reply topic only makes the oldest ones recomputed.
"""

from __future__ import annotations

import functools
import re

from inference_worker.transports import topics

DLQ_SUFFIX = ".dlq"
_LEVEL = re.compile(r"[A-Za-z0-9_-]+")
_LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")
_KEPT = 4096  # names per direction; a failed mapping is never kept


@functools.lru_cache(maxsize=_KEPT)
def kafka_topic(name: str) -> str:
    """The Kafka name of an MQTT-style topic name (`a/b` → `a.b`); ValueError if it has none."""
    topics.validate_topic(name)
    levels = name.split("/")
    suffix = ""
    if len(levels[-1]) > len(DLQ_SUFFIX) and levels[-1].endswith(DLQ_SUFFIX):
        levels[-1], suffix = levels[-1][: -len(DLQ_SUFFIX)], DLQ_SUFFIX
    elif len(levels) > 1 and levels[-1] == "dlq":
        raise ValueError(f"topic {name!r}: a last level 'dlq' would collide with '.dlq'")
    for level in levels:
        if not _LEVEL.fullmatch(level):
            raise ValueError(
                f"topic {name!r} has no Kafka name: each level must be non-empty "
                "[A-Za-z0-9_-] (a '.' inside a level would not map back)"
            )
    mapped = ".".join(levels) + suffix
    if len(mapped) > 249 or mapped.startswith("__"):
        raise ValueError(f"topic {name!r} has no Kafka name (too long, or internal '__')")
    return mapped


@functools.lru_cache(maxsize=_KEPT)
def mqtt_topic(name: str) -> str:
    """The MQTT-style name of a Kafka topic (`a.b` → `a/b`); ValueError if it has none."""
    if not _LEGAL.fullmatch(name):
        raise ValueError(f"{name[:300]!r} is not a legal Kafka topic name")
    levels = name.split(".")
    if len(levels) > 1 and levels[-1] == "dlq":
        levels[-2:] = [levels[-2] + DLQ_SUFFIX]
    mapped = "/".join(levels)
    if kafka_topic_or_none(mapped) != name:
        raise ValueError(f"Kafka topic {name!r} has no MQTT-side name (empty level or '__')")
    return mapped


def kafka_topic_or_none(name: str) -> str | None:
    """`kafka_topic(name)`, or None where it has no Kafka name."""
    try:
        return kafka_topic(name)
    except ValueError:
        return None


def subscription_pattern(topic_filter: str) -> str | None:
    """A regex for a wildcard filter (see the module docstring), None for a plain topic."""
    topics.validate_filter(topic_filter)
    levels = topic_filter.split("/")
    if "+" not in levels and "#" not in levels:
        return None
    multi = levels[-1] == "#"
    literal = levels[:-1] if multi else levels
    for level in literal:
        if level != "+" and not _LEVEL.fullmatch(level):
            raise ValueError(f"filter {topic_filter!r}: level {level!r} has no Kafka name")
    parts = ["[^.]+" if lv == "+" else re.escape(lv) for lv in literal]
    if not multi:
        body = r"\.".join(parts)
    elif parts:
        body = r"\.".join(parts) + r"(?:\..*)?"
    else:
        body = ".*"
    return rf"(?!.*\.dlq$){body}"
