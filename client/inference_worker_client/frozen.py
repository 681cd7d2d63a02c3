"""`quick_init`: a frozen dataclass whose ``__init__`` skips ``object.__setattr__``.

``@dataclass(frozen=True)`` generates an ``__init__`` that sets every field through
``object.__setattr__(self, name, value)``, because the class's own ``__setattr__``
refuses. That is a global lookup, an attribute lookup and a call per field: a 10-field
object took ~1.3 µs to build here against ~0.3 µs unfrozen, and the worker builds about
ten such objects per request (its GIL profile at full load had 11.5 % of the samples in
those ``__init__`` bodies, 2026-12-07). The ``__init__`` made here writes the instance's
``__dict__`` directly, or for a slotted class calls each slot's descriptor: the same
object, exactly as frozen afterwards (``__setattr__`` still refuses), about half the cost.

Only what the generated code reproduces exactly is accepted: fields that are all in
``__init__``, with defaults, default factories and keyword-only fields; a class with
``__post_init__`` or ``InitVar`` pseudo-fields is refused at decoration (it keeps the
generated ``__init__`` by not using this).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, TypeVar

T = TypeVar("T")

_Q_FACTORY = object()  # a parameter left to its default factory


def quick_init(cls: type[T]) -> type[T]:
    """Replace a frozen dataclass's ``__init__``; apply above ``@dataclass``."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or not params.init:
        raise TypeError(f"{cls.__name__}: quick_init is for frozen dataclasses with __init__")
    own = getattr(cls.__dict__.get("__init__"), "__code__", None)
    if own is None or own.co_filename != "<string>":  # dataclasses makes its own by exec
        raise TypeError(f"{cls.__name__}: its __init__ is not the one dataclasses made")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: __post_init__ needs the generated __init__")
    every = cls.__dataclass_fields__.values()  # type: ignore[attr-defined]
    if any(f._field_type is not dataclasses._FIELD for f in every):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: InitVar and ClassVar fields are not supported")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if any(not f.init for f in fields):
        raise TypeError(f"{cls.__name__}: fields outside __init__ are not supported")
    slots = {f.name: _slot(cls, f.name) for f in fields}  # None: the field is in __dict__
    env: dict[str, Any] = {"_Q_FACTORY": _Q_FACTORY}
    positional: list[str] = []
    keyword: list[str] = []
    in_dict = any(slot is None for slot in slots.values())
    body: list[str] = ["    _q_dict = self.__dict__"] if in_dict else []
    for i, f in enumerate(fields):
        param, value = f.name, f.name
        if f.default is not dataclasses.MISSING:
            env[f"_qd{i}"] = f.default
            param += f"=_qd{i}"
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_qf{i}"] = f.default_factory
            param += "=_Q_FACTORY"
            value = f"(_qf{i}() if {value} is _Q_FACTORY else {value})"
        (keyword if f.kw_only else positional).append(param)
        slot = slots[f.name]
        if slot is not None:
            env[f"_qs{i}"] = slot.__set__
            body.append(f"    _qs{i}(self, {value})")
        else:
            body.append(f"    _q_dict[{f.name!r}] = {value}")
    # Parameters carry the fields' own names, so keyword calls and dataclasses.replace
    # work; a field named like one of the helpers below would shadow it, so it is refused.
    clash = {f.name for f in fields} & {*env, "self", "_q_dict"}
    if clash:
        raise TypeError(f"{cls.__name__}: field names {sorted(clash)} clash with quick_init's")
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = f"def __init__({signature}):\n" + "\n".join(body or ["    pass"]) + "\n"
    exec(source, env)  # the source is built from the class's own field names only
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses a method assignment
    return cls


def _slot(cls: type, name: str) -> Any:
    """The slot descriptor that ``object.__setattr__`` would use for field ``name``, or
    None when it would write the instance's ``__dict__``: the first class in the MRO that
    has the name decides, as in attribute lookup."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            return found if isinstance(found, types.MemberDescriptorType) else None
    return None
