"""A registry in the style of the layer registry: a dict of name → entry filled by a decorator, and a
lookup whose error lists the valid names."""
from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from lymph_cv.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order; ``kind`` names them in errors ("unknown <kind> 'x'")."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding its class or function under ``name``."""

        def decorate(entry: T) -> T:
            if name in self.entries:
                raise ConfigError(f"{self.kind} {name!r} registered twice")
            self.entries[name] = entry
            return entry

        return decorate

    def lookup(self, name: str) -> T:
        """The entry ``name``; ConfigError listing the valid names."""
        try:
            return self.entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}", valid=self.names()) from None

    def names(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries
