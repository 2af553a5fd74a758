"""One bounded memo for every remembered computation of the decision path.

A memo is declared with the parts of its input its key is made of (``signature``) and a bound.
Decisions repeat: a planner sends the same few request shapes, a node type offers the same few
free masks. Every value remembered here is a pure function of its key, so forgetting is always
safe; when a memo is full it is cleared at once (the next decisions refill the few keys in use),
which keeps a lookup one dictionary access, with no bookkeeping per hit.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """A dictionary of at most ``bound`` entries, keyed by ``signature`` (what the value depends on)."""

    __slots__ = ("bound", "data", "signature")

    def __init__(self, signature: str, bound: int) -> None:
        if bound < 1:
            raise ValueError(f"memo {signature!r}: bound {bound} is not positive")
        self.signature = signature
        self.bound = bound
        self.data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The value remembered for ``key``, or None."""
        return self.data.get(key)

    def put(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` (clearing first when full); returns ``value``."""
        data = self.data
        if len(data) >= self.bound:
            data.clear()
        data[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)

    def clear(self) -> None:
        """Forget everything (the inputs the values depend on changed)."""
        self.data.clear()
