"""FFCV's import compiles numba typed-dict code; importing fastcifar.data caches it on disk, so
the second process loads it instead of compiling it again."""

from __future__ import annotations

import json
import os
import resource
import signal
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


def probe(cache_dir, preexec_fn=None) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}, timeout=180,
                            preexec_fn=preexec_fn)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_second_process_loads_the_typed_dict_code_the_first_compiled(tmp_path):
    first = probe(tmp_path)
    assert first == {"cache_hits": 0, "cache_misses": 2}  # compiled, then written to the cache
    assert list(tmp_path.rglob("typeddict._setitem-*.nbi"))
    assert probe(tmp_path) == {"cache_hits": 2, "cache_misses": 0}  # loaded, not compiled


def _files_of_at_most_2000_bytes() -> None:
    """The cache's files cannot be written whole: as on a full disk (EFBIG, not a signal)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_cache_that_cannot_be_written_costs_a_compile_not_the_import(tmp_path):
    assert probe(tmp_path, _files_of_at_most_2000_bytes) == {"cache_hits": 0, "cache_misses": 2}


def test_no_folder_to_cache_in_leaves_the_import_as_it_was(monkeypatch):
    from numba.core.caching import FunctionCache

    from fastcifar.data.numba_dict_cache import cache_typed_dict_compiles

    def no_cache_location(self, py_func) -> None:
        raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setattr(FunctionCache, "__init__", no_cache_location)
    assert cache_typed_dict_compiles() is False


def test_a_dict_of_values_numba_cannot_cache_is_compiled_without_a_warning(tmp_path):
    # jitclass instances hold dynamic globals: numba compiles their dict's helpers each time,
    # as before the cache, and its "Cannot cache" warning about our setting is filtered.
    program = """
import fastcifar.data
from numba import types
from numba.experimental import jitclass
from numba.typed import Dict

@jitclass([("x", types.int64)])
class Box:
    def __init__(self, x):
        self.x = x

boxes = Dict()
boxes["a"] = Box(1)
assert boxes["a"].x == 1
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Cannot cache" not in result.stderr, result.stderr[-2000:]
