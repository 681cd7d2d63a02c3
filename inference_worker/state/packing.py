"""Redis command packing for the request path's large script calls.

A claim or a completion names two keys per request, ~130 arguments for a group of 64.
redis-py's asyncio `pack_command` is Python per argument (the encoder's type checks, and
a join of the growing buffer per argument): measured here 86 us for such a call, about a
third of the worker's Redis CPU. hiredis (a dependency) packs the same bytes in C in
~10 us; without it (or for an argument type it refuses) the command is packed in
Python with one join (69 us). Values over redis-py's cutoff still travel as their own
chunk there, not copied, as in redis-py.

Applied to the connection class of a single Redis (`connect.open_client`); a cluster's
nodes keep redis-py's own class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection

_c_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _c_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; kept optional at run time
    _c_pack = None

_CRLF = b"\r\n"


class FastPacking:
    """Mixin over a redis-py asyncio connection class: `pack_command` in C, or in one pass."""

    encoder: Any
    _buffer_cutoff: int

    def pack_command(self, *args: Any) -> list[bytes | memoryview]:
        # As redis-py: a command name with spaces ("CONFIG GET") is several arguments.
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        # hiredis packs str, bytes, int, float (as repr) and buffers exactly as redis-py's
        # encoder does; it refuses anything else (bool, None) with TypeError, and then
        # redis-py's encoder raises its own error for it.
        if _c_pack is not None:
            try:
                return [_c_pack(args)]
            except TypeError:
                pass
        return self._pack_python(args)

    def _pack_python(self, args: tuple[Any, ...]) -> list[bytes | memoryview]:
        cutoff = self._buffer_cutoff
        output: list[bytes | memoryview] = []
        parts: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
        for arg in map(self.encoder.encode, args):
            if len(arg) > cutoff or isinstance(arg, memoryview):
                parts.append(b"$%d\r\n" % len(arg))
                output.append(b"".join(parts))
                output.append(arg)
                parts = [_CRLF]
            else:
                parts += (b"$%d\r\n" % len(arg), arg, _CRLF)
        output.append(b"".join(parts))
        return output


_made: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def fast_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """`cls` with `FastPacking` in front (one subclass per class, made once)."""
    if cls not in _made:
        _made[cls] = type(f"Fast{cls.__name__}", (FastPacking, cls), {})
    return _made[cls]
