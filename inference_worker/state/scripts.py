"""The Lua sources of the Redis store, each composed from the shared preamble + its body.

Every script needs the same head (the `#!lua` shebang, the server clock in ms, the member
inside a req key); keeping it in one file (`preamble.lua`) means a fix lands once. The
sources are composed here, once, when the store starts and loads them (EVALSHA from then
on), so a body file alone is not a runnable script.
"""

from __future__ import annotations

import importlib.resources

__all__ = ["SCRIPTS", "script_source"]

# The bodies the Redis store loads at start (quota.lua is loaded by quota.py on its own).
SCRIPTS = (
    "abandon.lua",
    "claim.lua",
    "complete.lua",
    "peek.lua",
    "renew.lua",
    "schedule.lua",
    "takeover.lua",
)


def _read(name: str) -> str:
    return importlib.resources.files("inference_worker.state").joinpath(name).read_text()


def script_source(name: str) -> str:
    """The runnable source of script `name`: the preamble, then its body."""
    return _read("preamble.lua") + _read(name)
