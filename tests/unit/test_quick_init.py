"""`quick_init` builds the same frozen objects as the ``__init__`` dataclasses generates."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from inference_worker_client.frozen import quick_init


def _plain_and_quick(cls_source: str) -> tuple[type, type]:
    """The class defined twice from one source: once as dataclasses leaves it, once quick."""
    made: list[type] = []
    for decorate in (False, True):
        scope: dict[str, object] = {"dataclass": dataclass, "field": field}
        exec(cls_source, scope)
        cls = scope["C"]
        assert isinstance(cls, type)
        made.append(quick_init(cls) if decorate else cls)
    return made[0], made[1]


_SHAPES = {
    "dict": "@dataclass(frozen=True)\nclass C:\n"
    "    a: int\n    b: str = 'x'\n    c: list = field(default_factory=list)\n"
    "    d: int = field(default=5, kw_only=True)\n    e: tuple = field(kw_only=True, default=())\n",
    "slots": "@dataclass(frozen=True, slots=True)\nclass C:\n"
    "    a: int\n    b: bytes = b''\n    c: dict = field(default_factory=dict)\n",
    "kw_only": "@dataclass(frozen=True, kw_only=True)\nclass C:\n    a: int\n    b: int = 2\n",
    "empty": "@dataclass(frozen=True)\nclass C:\n    pass\n",
}


def _values(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_same_fields_as_the_generated_init(shape: str) -> None:
    plain, quick = _plain_and_quick(_SHAPES[shape])
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = {
        "dict": [((1,), {}), ((1, "y", [3]), {"d": 7, "e": (1,)}), ((), {"a": 2, "c": [9]})],
        "slots": [((1,), {}), ((1, b"q"), {"c": {"k": 1}}), ((), {"b": b"z", "a": 0})],
        "kw_only": [((), {"a": 1}), ((), {"a": 1, "b": 3})],
        "empty": [((), {})],
    }[shape]
    for args, kwargs in calls:
        want, got = plain(*args, **kwargs), quick(*args, **kwargs)
        assert _values(got) == _values(want)
        assert repr(got) == repr(want)
        assert hash(got) == hash(want) if _hashable(want) else True


def _hashable(obj: object) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("shape", ["dict", "slots"])
def test_stays_frozen_and_replace_works(shape: str) -> None:
    _, quick = _plain_and_quick(_SHAPES[shape])
    obj = quick(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.a = 2
    again = dataclasses.replace(obj, a=4)
    assert again.a == 4 and again.b == obj.b
    assert type(again) is quick


def test_each_object_gets_a_fresh_factory_value() -> None:
    _, quick = _plain_and_quick(_SHAPES["dict"])
    first, second = quick(1), quick(1)
    assert first.c == [] and first.c is not second.c
    mine = [1]
    assert quick(1, "x", mine).c is mine


def test_signature_errors_match() -> None:
    plain, quick = _plain_and_quick(_SHAPES["dict"])
    for cls in (plain, quick):
        with pytest.raises(TypeError):
            cls()
        with pytest.raises(TypeError):
            cls(1, "x", [], 4)  # d is keyword-only
        with pytest.raises(TypeError):
            cls(1, z=3)


def test_slotted_subclass_uses_the_base_slots() -> None:
    @dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @quick_init
    @dataclass(frozen=True, slots=True)
    class Child(Base):
        b: int = 0

    obj = Child(1, 2)
    assert (obj.a, obj.b) == (1, 2)
    assert not hasattr(obj, "__dict__")


def test_mixed_slotted_and_dict_hierarchies() -> None:
    """Slots from one class and __dict__ from another: each field goes where
    `object.__setattr__` would put it (the first class in the MRO naming it decides)."""

    @dataclass(frozen=True)
    class Plain:
        a: int

    @quick_init
    @dataclass(frozen=True, slots=True)
    class SlottedOnPlain(Plain):
        b: int = 0

    @dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    @quick_init
    @dataclass(frozen=True)
    class PlainOnSlotted(Slotted):
        b: int = 0

    @quick_init
    @dataclass(frozen=True)
    class Redefined(Slotted):
        a: int = 7  # a class default in front of the base's slot: __dict__ wins

    for cls in (SlottedOnPlain, PlainOnSlotted):
        obj = cls(1, 2)
        assert (obj.a, obj.b) == (1, 2), cls.__name__
        assert dataclasses.replace(obj, b=5).b == 5
    assert Redefined(3).a == 3 and Redefined().a == 7


def test_refuses_what_it_cannot_reproduce() -> None:
    @dataclass
    class Mutable:
        a: int

    @dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True)
    class Hidden:
        a: int
        b: int = field(default=0, init=False)

    @dataclass(frozen=True)
    class Init:
        a: int
        z: dataclasses.InitVar[int] = 0

    @dataclass(frozen=True)
    class Clash:
        _q_dict: int

    @dataclass(frozen=True)
    class OwnInit:
        a: int

        def __init__(self, a: int) -> None:
            object.__setattr__(self, "a", a * 2)

    @dataclass(frozen=True, init=False)
    class NoInit:
        a: int = 0

    for cls in (Mutable, Post, Hidden, Init, Clash, OwnInit, NoInit, int):
        with pytest.raises(TypeError):
            quick_init(cls)
