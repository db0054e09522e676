"""What the train augmentation options do to a recipe's AugmentConfig: each given one replaces
its setting, and --no-augment refuses the options it would ignore."""

from __future__ import annotations

import dataclasses

from fastcifar.config import NO_AUGMENT, AugmentConfig
from fastcifar.errors import FastCifarError

# Per image, once --jitter or --hue turns colour jitter on: the seed recipe's probability,
# whichever recipe it is added to, so the same options give the same augmentation.
JITTER_PROBABILITY = 0.5


def augment_with_options(base: AugmentConfig, cutout: int | None, jitter: float | None,
                         hue: float | None, p_gray: float | None, pad: int | None = None,
                         flip_alternate: bool | None = None,
                         cutout_count: int | None = None) -> AugmentConfig:
    """The recipe's augmentation with the augmentation options replacing its settings; a
    --cutout size on a recipe with no holes turns one hole on, and a --cutout-count on holes
    of 0 px (that it would leave uncut) is refused."""
    if cutout and cutout_count is None and base.cutout_count == 0:
        cutout_count = 1
    if cutout_count and not (base.cutout_size if cutout is None else cutout):
        raise FastCifarError(f"--cutout-count {cutout_count} cuts nothing: this recipe's holes are "
                             "0 px; give their size with --cutout SIZE")
    changes: dict[str, object] = {key: value for key, value in {
        "cutout_size": cutout, "p_gray": p_gray, "hue": hue, "pad": pad,
        "flip_alternate": flip_alternate, "cutout_count": cutout_count}.items()
        if value is not None}
    if jitter is not None:
        changes.update(brightness=jitter, contrast=jitter, saturation=jitter)
        if not jitter and hue is None:  # --jitter 0: no colour jitter at all
            changes["hue"] = 0.0
    if jitter is not None or hue is not None:
        changes["p_jitter"] = JITTER_PROBABILITY
    return dataclasses.replace(base, **changes)


def no_augment_refusing_options(cutout: int | None, jitter: float | None, hue: float | None,
                                p_gray: float | None, pad: int | None = None,
                                flip_alternate: bool | None = None,
                                cutout_count: int | None = None) -> AugmentConfig:
    """NO_AUGMENT, refusing augmentation options it would silently ignore."""
    given = [f"--{name}" for name, value in (("cutout", cutout), ("jitter", jitter),
                                             ("hue", hue), ("p-gray", p_gray), ("pad", pad),
                                             ("flip-alternate", flip_alternate),
                                             ("cutout-count", cutout_count))
             if value is not None]
    if given:
        raise FastCifarError(f"--no-augment turns all augmentation off: drop it or "
                             f"{', '.join(given)}")
    return NO_AUGMENT
