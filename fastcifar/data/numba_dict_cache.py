"""Keep numba's compiled typed-dict code on disk, so that importing FFCV takes seconds less.

FFCV fills a `numba.typed.Dict` when its image field module is imported. numba compiles the
dict's helpers in every new process and never caches them: 4-9 s of each process's start-up
(each command, torchrun rank and test process). Turning on numba's own on-disk cache for those
helpers, as `@njit(cache=True)` does for a function of ours, compiles them once per machine.
"""

from __future__ import annotations

import contextlib
import re
import warnings


def cache_typed_dict_compiles() -> bool:
    """Give numba's typed-dict helpers an on-disk cache; False (and the import stays as slow
    as before) where numba has no such helpers or no folder to cache them in."""
    try:
        from numba.core.caching import FunctionCache
        from numba.core.errors import NumbaWarning
        from numba.core.registry import CPUDispatcher
        from numba.typed import typeddict
    except ImportError:
        return False

    class BestEffortCache(FunctionCache):
        """A cache whose failed write (a full disk) costs a compile next time, not the import."""

        def save_overload(self, sig, data) -> None:
            with contextlib.suppress(OSError):
                super().save_overload(sig, data)

    helpers = {name: value for name, value in vars(typeddict).items()
               if isinstance(value, CPUDispatcher)}
    try:
        for helper in helpers.values():
            helper._cache = BestEffortCache(helper.py_func)  # what enable_caching() sets
    except RuntimeError:  # no folder to cache in
        return False
    # A dict of values numba cannot cache (jitclass instances) is compiled as before, quietly.
    names = "|".join(map(re.escape, helpers))
    warnings.filterwarnings("ignore", message=f'Cannot cache compiled function "({names})"',
                            category=NumbaWarning)
    return bool(helpers)
