"""Keep numba's compiled typed-dict code on disk, so that importing FFCV takes seconds less.

FFCV fills a `numba.typed.Dict` when its image field module is imported. numba compiles the
dict's helpers in every new process and never caches them: 4-9 s of each process's start-up
(each command, torchrun rank and test process). Turning on numba's own on-disk cache for those
helpers, as `@njit(cache=True)` does for a function of ours, compiles them once per machine.
"""

from __future__ import annotations


def cache_typed_dict_compiles() -> bool:
    """Give numba's typed-dict helpers an on-disk cache; False (and the import stays as slow
    as before) where numba has no such helpers or no folder to cache them in."""
    try:
        from numba.core.registry import CPUDispatcher
        from numba.typed import typeddict
    except ImportError:
        return False
    helpers = [value for value in vars(typeddict).values() if isinstance(value, CPUDispatcher)]
    try:
        for helper in helpers:
            helper.enable_caching()
    except (AttributeError, RuntimeError):  # another numba; no writable cache location
        return False
    return bool(helpers)
