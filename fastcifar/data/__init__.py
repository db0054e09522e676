"""The data path: sources -> convert (.beton) -> augment (JIT op) -> loaders."""
