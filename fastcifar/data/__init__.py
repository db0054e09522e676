"""The data path: sources -> convert (.beton) -> augment (JIT op) -> loaders."""

from fastcifar.data.numba_dict_cache import cache_typed_dict_compiles

# Before any FFCV import: FFCV's import compiles numba typed-dict code (numba_dict_cache.py).
cache_typed_dict_compiles()
