"""FFCV's import compiles numba typed-dict code; importing fastcifar.data caches it on disk, so
the second process loads it instead of compiling it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# What FFCV's image field module does at import, after fastcifar.data is imported.
PROBE = """
import json
import fastcifar.data
from numba.typed import Dict, typeddict
modes = Dict()
modes["jpg"] = 0
modes["raw"] = 1
assert modes["jpg"] == 0 and modes["raw"] == 1
helpers = (typeddict._setitem, typeddict._getitem)
print(json.dumps({kind: sum(sum(getattr(helper.stats, kind).values()) for helper in helpers)
                  for kind in ("cache_hits", "cache_misses")}))
"""


def probe(cache_dir) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_second_process_loads_the_typed_dict_code_the_first_compiled(tmp_path):
    first = probe(tmp_path)
    assert first == {"cache_hits": 0, "cache_misses": 2}  # compiled, then written to the cache
    assert list(tmp_path.rglob("typeddict._setitem-*.nbi"))
    assert probe(tmp_path) == {"cache_hits": 2, "cache_misses": 0}  # loaded, not compiled


def test_an_uncacheable_numba_leaves_the_import_working(monkeypatch):
    from numba.core.dispatcher import Dispatcher

    from fastcifar.data.numba_dict_cache import cache_typed_dict_compiles

    def no_cache_location(self) -> None:
        raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setattr(Dispatcher, "enable_caching", no_cache_location)
    assert cache_typed_dict_compiles() is False
