"""A small cache of the per-value constants of a KJT layout, for the per-step work around lookups.

Batches of one shape (Criteo's: one id per feature) share a layout (key order and length per
key), so the constants a split of their ids needs (per-value divisors, offsets, gathers) are
built once rather than every step.
"""

from typing import Callable, Dict, Hashable, TypeVar

T = TypeVar("T")


class LayoutCache:
    """Entries built once per key (a KJT layout and what else they depend on), ``size`` kept.

    The oldest entry is dropped first. Keys are compared by value, so a module rebuilt with the
    same tables (as a traced graph rebuilds its constants) finds its entries.

    Args:
        size: the most entries kept.

    Example::

        cache = LayoutCache()
        divisors = cache.get((tuple(kjt.keys()), tuple(kjt.length_per_key())), build)
    """

    def __init__(self, size: int = 8) -> None:
        self._entries: Dict[Hashable, object] = {}
        self._size = size

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The entry of ``key``, built by ``build()`` on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]
            entry = self._entries[key] = build()
        return entry  # type: ignore[return-value]
