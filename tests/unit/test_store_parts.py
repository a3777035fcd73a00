"""The store's facade is the sum of its parts: no part may hide another's method, since a class
listed later in Store's bases would silently lose a method of the same name to an earlier one."""

from __future__ import annotations

import inspect

from shared.store import Store
from shared.store.base import Part


def own_names(cls: type) -> set[str]:
    """Methods and scripts a part defines itself (not those of Part or object)."""
    return {n for n, v in vars(cls).items() if not n.startswith("__") and (inspect.isfunction(v) or n.startswith("_"))}


def clashes(facade: type) -> list[str]:
    parts = [c for c in facade.__mro__[1:] if issubclass(c, Part) and c is not Part]
    out = []
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            out += [f"{a.__name__}.{n} hides {b.__name__}.{n}" for n in sorted(own_names(a) & own_names(b))]
    return out


def test_no_part_of_the_store_hides_another() -> None:
    assert clashes(Store) == []


def test_the_check_sees_a_hidden_method() -> None:
    class A(Part):
        async def get(self) -> None: ...

    class B(Part):
        async def get(self) -> None: ...

    class Facade(A, B):
        pass

    assert clashes(Facade) == ["A.get hides B.get"]
