"""fastcifar: train CIFAR-10 fast on one machine with an FFCV data path and CustResNet.

From Python: `fastcifar.convert()`, `fastcifar.train(epochs=6)`, `fastcifar.lr_find()`,
`fastcifar.evaluate(weights)`, `fastcifar.predict(images)` (see `fastcifar.api`); the config
objects in `fastcifar.config` and `fastcifar.command_config` give full control."""

__version__ = "0.1.0"

ENTRY_POINTS = ("convert", "train", "train_config", "lr_find", "evaluate", "predict")
__all__ = [*ENTRY_POINTS, "__version__"]


def __getattr__(name: str):
    """The entry points, imported on first use: `import fastcifar` (and the CLI) stays light."""
    if name in ENTRY_POINTS:
        from fastcifar import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastcifar' has no attribute {name!r}")
