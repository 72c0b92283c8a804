"""The one registry type: the named plug-ins of one family (arrival processes, target kinds, load APIs, stages).

A name is registered once (a second registration under it is refused, naming both), and looking up a name that is
not there is an error listing the known ones, so a typo in an experiment file says what it could have been. Pure:
imported by every layer, it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name no plug-in of the family is registered under (a ValueError, so pydantic reports it as invalid input)."""


class Registry(Generic[T]):
    """Plug-ins of one family by name, in the order they were registered. `family` names them in errors
    ("arrival kind", "target kind", "load api", "stage")."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add `item` under `name`; a name registered twice is refused."""
        if name in self._items:
            both = f"{_label(self._items[name])}, {_label(item)}"
            raise ValueError(f"{self.family} {name!r} is registered twice ({both})")
        self._items[name] = item
        return item

    def add(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@REGISTRY.add("name")` registers the class under `name`."""

        def decorate(item: T) -> T:
            return self.register(name, item)

        return decorate

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(self.unknown(name)) from None

    def unknown(self, name: object) -> str:
        """The error for a name that is not registered: the names that are."""
        known = ", ".join(self._items) or "none registered"
        return f"unknown {self.family} {name!r}; known {self.family.split()[-1]}s: {known}"

    def __delitem__(self, name: str) -> None:
        """Remove a registration (a test's own plug-in, when it is done)."""
        del self._items[name]

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())


def _label(item: object) -> str:
    return getattr(item, "__name__", None) or repr(item)
