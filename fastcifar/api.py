"""The Python entry points, `import fastcifar`: convert, train, lr_find, evaluate and predict with
plain keyword arguments and the default recipe. They build the same config objects the CLI does
(`fastcifar.config`, `fastcifar.command_config`), which remain for full control. Progress shows
as a tqdm bar, a widget in a notebook and a text bar in a terminal, with one printed line per
epoch."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import numpy as np

from fastcifar.command_config import EvaluateConfig, LrFindConfig, PredictConfig
from fastcifar.config import (
    DEFAULT_RECIPE,
    ConvertConfig,
    Device,
    LoaderConfig,
    TrainConfig,
    optimizer_rule,
    recipe,
    replace_nested,
)
from fastcifar.errors import FastCifarError
from fastcifar.records import EpochStats, Evaluation, TrainResult
from fastcifar.training import TrainCallbacks


def convert(source: str | Path | None = None, out_dir: str | Path = "datasets",
            force: bool = False, fix_images: bool = False):
    """Write the betons and metadata into `out_dir` (see `fastcifar convert`)."""
    from fastcifar.data.convert import convert as run_convert

    return run_convert(ConvertConfig(source=None if source is None else Path(source),
                                     out_dir=Path(out_dir), force=force, fix_images=fix_images))


def train_config(epochs: int | None = None, recipe_name: str = DEFAULT_RECIPE,
                 data: str | Path = "datasets", train_subset: int | None = None,
                 test_subset: int | None = None, batch_size: int | None = None,
                 holdout: int = 0, workers: int = 0, **settings: object) -> TrainConfig:
    """The recipe at `epochs` (its budget settings included) with `settings` replacing its
    fields (TrainConfig's names; `augment__pad=4` for a nested one). As in `fastcifar train`,
    `optimizer="adam"` turns Muon off unless `muon_lr` is given, and a run without Muon drops
    the recipe's filter normalization unless it is given."""
    base = recipe(recipe_name, **({} if epochs is None else {"epochs": epochs}))
    settings = {key: _as_field_type(base, key, value) for key, value in settings.items()}
    settings = {**optimizer_rule(settings.get("optimizer"), settings.get("muon_lr"),
                                 settings.get("muon_normalize_filters")), **settings}
    loader = LoaderConfig(data_dir=Path(data), train_subset=train_subset,
                          test_subset=test_subset, holdout=holdout, workers=workers,
                          batch_size=base.loader.batch_size if batch_size is None else batch_size)
    try:
        return replace_nested(base, loader=loader, **settings)
    except TypeError as error:
        raise FastCifarError(f"unknown train setting: {error}; settings are TrainConfig's "
                             "fields") from None


def _as_field_type(config: TrainConfig, key: str, value: object) -> object:
    """`value` as the enum its field holds (`device="cpu"` -> Device.cpu), so the run gets the
    types the CLI gives it; other values pass as they are."""
    current: object = config
    for part in key.split("__"):
        current = getattr(current, part, None)
    if isinstance(current, Enum) and isinstance(value, str):
        return _enum_value(type(current), value, key)
    return value


def _enum_value(kind: type[Enum], value: str, name: str) -> Enum:
    try:
        return kind(value)
    except ValueError:
        raise FastCifarError(f"{name} must be one of {', '.join(item.value for item in kind)}, "
                             f"got {value!r}") from None


def train(epochs: int | None = None, recipe_name: str = DEFAULT_RECIPE,
          data: str | Path = "datasets", progress: bool = True, **settings: object
          ) -> TrainResult:
    """Train CustResNet; the result holds the per-epoch `history`, every test pass and the
    paths of the run folder and weights. Other keywords: see `train_config`."""
    from fastcifar.training import train as run_training

    config = train_config(epochs, recipe_name, data, **settings)
    return run_training(config, EpochBars() if progress else None)


def lr_find(recipe_name: str = DEFAULT_RECIPE, data: str | Path = "datasets",
            iterations: int = 200, out_dir: str | Path = "runs/lr-find", start_lr: float = 1e-7,
            end_lr: float = 10.0, mode: str = "exp", **settings: object):
    """The LR range test for a training run, from `start_lr` to `end_lr` (exp or linear steps;
    see `fastcifar lr-find`). Other keywords: see `train_config`."""
    from fastcifar.range_test import lr_find as run_range_test

    return run_range_test(LrFindConfig(train=train_config(None, recipe_name, data, **settings),
                                       start_lr=start_lr, end_lr=end_lr, iterations=iterations,
                                       mode=mode, out_dir=Path(out_dir)))


def evaluate(weights: str | Path, data: str | Path = "datasets", tta: str | None = None,
             test_subset: int | None = None, out_dir: str | Path | None = None,
             device: str = "auto"):
    """Test accuracy of a weights file, per class, with its figures (see `fastcifar evaluate`)."""
    from fastcifar.evaluation import evaluate_weights

    return evaluate_weights(EvaluateConfig(
        weights=Path(weights), loader=LoaderConfig(data_dir=Path(data), test_subset=test_subset),
        tta=tta, out_dir=None if out_dir is None else Path(out_dir),
        device=_enum_value(Device, device, "device")))


def predict(images, weights: str | Path | None = None, top_k: int = 3, device: str = "auto"):
    """The top classes of `images`: file paths (one or a list), Pillow images, or uint8 RGB
    arrays (H, W, 3) or (N, H, W, 3); other sides than 32 are resized. Weights: the shipped
    file unless given (a .safetensors from training or an exported .onnx)."""
    from fastcifar.prediction import open_scorer, score_images

    config = PredictConfig(paths=("<in memory>",), top_k=top_k,
                           device=_enum_value(Device, device, "device"),
                           **({} if weights is None else {"weights": Path(weights)}))
    scorer = open_scorer(Path(config.weights), config.device)
    return score_images(scorer, _as_images(images), top_k, config.batch_size)


def _as_images(images) -> list:
    """Paths, Pillow images or uint8 arrays as the pixels predict scores."""
    from PIL import Image, ImageOps

    from fastcifar.prediction import image_from_pil, read_image

    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise FastCifarError(f"arrays must be uint8 RGB (H, W, 3) or (N, H, W, 3), got "
                                 f"{images.dtype} {images.shape}")
        batch = images[None] if images.ndim == 3 else images
        return [image_from_pil(Image.fromarray(pixels), Path(f"image {index}"), "RGB",
                               (pixels.shape[1], pixels.shape[0]))
                for index, pixels in enumerate(batch)]
    items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
    loaded = []
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray) and item.ndim == 3:  # one image of a mixed list
            (pixels,) = _as_images(item)
            loaded.append(dataclasses.replace(pixels, path=Path(f"image {index}")))
        elif isinstance(item, Image.Image):  # upright, as a file path's image is read
            upright = ImageOps.exif_transpose(item)
            loaded.append(image_from_pil(upright.convert("RGB"), Path(f"image {index}"),
                                         upright.mode, upright.size))
        elif isinstance(item, str | Path):
            loaded.append(read_image(Path(item)))
        else:
            raise FastCifarError(f"cannot predict a {type(item).__name__}: give paths, Pillow "
                                 "images or uint8 arrays (H, W, 3)")
    return loaded


def test_images(data: str | Path = "datasets", count: int = 16) -> tuple[np.ndarray, list[str]]:
    """The first `count` converted test images as uint8 (N, 32, 32, 3) RGB and their class
    names: something to try `predict` on."""
    from fastcifar.data.loaders import first_stored_images, read_metadata

    if count < 1:
        raise FastCifarError(f"count must be positive, got {count}")
    metadata = read_metadata(Path(data))
    if count > metadata.test_count:  # fewer than asked, silently, before
        raise FastCifarError(f"count {count:,} is more than the {metadata.test_count:,} test images")
    images, labels = first_stored_images(Path(data), "test", count)
    return images, [metadata.class_names[label] for label in labels]


class EpochBars(TrainCallbacks):
    """A tqdm bar per epoch (a widget in a notebook) and one printed line after it."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, config: TrainConfig, steps_per_epoch: int, device: object,
                       precision: str, run_dir: Path) -> None:
        from fastcifar.progress import optimiser_text

        print(f"recipe {config.recipe}, {config.epochs} epochs x {steps_per_epoch} steps, "
              f"{optimiser_text(config)}, {device} {precision}; run folder {run_dir}")

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False)
            self.bar.update(step - 1)
        self.bar.update(1)

    def on_epoch(self, stats: EpochStats) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        tested = (f", test loss {stats.test_loss:.4f}, test accuracy {stats.test_accuracy:.2%}"
                  if stats.test_accuracy is not None else "")
        print(f"epoch {stats.epoch} ({stats.train_size} px): train loss {stats.train_loss:.4f}, "
              f"train accuracy {stats.train_accuracy:.2%}{tested}, {stats.train_seconds:.1f} s")

    def on_evaluation(self, evaluation: Evaluation) -> None:
        print(f"epoch {evaluation.epochs:.2f}: test accuracy {evaluation.test_accuracy:.2%}")


def history_table(history: Iterable[EpochStats]) -> list[dict]:
    """The per-epoch rows as plain dicts (for pandas.DataFrame or printing)."""
    return [dataclasses.asdict(row) for row in history]
