"""CustResNet, the 6,573,130-parameter residual network: how a run builds and initialises it,
its summary and its receptive field."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.errors import FastCifarError


class ConvLayer(nn.Module):
    """3x3 conv (stride 1, pad 1, no bias) -> optional max-pool 2 -> BN -> ReLU -> optional dropout."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CustBlock(nn.Module):
    """A pooled ConvLayer, plus (optionally) a residual branch of two ConvLayers added to it."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = ConvLayer(in_channels, out_channels, pool=True, dropout=dropout)
        self.residual = (
            nn.Sequential(ConvLayer(out_channels, out_channels, dropout=dropout),
                          ConvLayer(out_channels, out_channels, dropout=dropout))
            if residual else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.residual(x) if self.residual is not None else x


# The prep layer's channels in CustResNet's plan (the blocks have 2, 4 and 8 times as many).
# Read when a model is built: the test suite narrows it for its many short training runs.
CUSTRESNET_WIDTH = 64


class CustResNet(nn.Module):
    """prep 64 -> block 128 + res -> block 256 -> block 512 + res -> global max-pool -> linear 10.

    The global max-pool is the 4x4 max-pool of the original layer plan at 32 px (the same
    function, no parameters), and it also takes the smaller maps of lower-resolution training.

    `logit_scale` multiplies the logits (a fixed constant, no parameter): a small scale such as
    0.125 keeps early softmax outputs soft, which lets high learning rates train stably.
    `width` (the prep layer's channels; None: CUSTRESNET_WIDTH, 64) narrows the same plan for
    the data-selection proxy (selection.py).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.0,
                 logit_scale: float = 1.0, width: int | None = None) -> None:
        super().__init__()
        width = CUSTRESNET_WIDTH if width is None else width
        self.prep = ConvLayer(3, width, dropout=dropout)
        self.layer1 = CustBlock(width, 2 * width, residual=True, dropout=dropout)
        self.layer2 = CustBlock(2 * width, 4 * width, residual=False, dropout=dropout)
        self.layer3 = CustBlock(4 * width, 8 * width, residual=True, dropout=dropout)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) * self.logit_scale


@torch.no_grad()
def whitening_filters(images: torch.Tensor, kernel_size: int = 3, eps: float = 5e-4
                      ) -> torch.Tensor:
    """The PCA-whitening basis of the images' k x k patches as conv filters (C*k*k, C, k, k).

    Rows are the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps), largest
    eigenvalue first: convolving with them gives decorrelated, unit-variance channels.
    """
    channels = images.shape[1]
    patches = nn.functional.unfold(images.float(), kernel_size=kernel_size)  # (N, C*k*k, L)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)).T.flip(0).float()
    return filters.reshape(-1, channels, kernel_size, kernel_size)


@torch.no_grad()
def whitening_init_(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Set the first filters of a 3x3 conv to the whitening basis of the images' 3x3 patches.

    The basis filters and their negatives (so the ReLU keeps both signs) give the conv
    decorrelated inputs from the first step; the parameter count is unchanged. Returns how many
    filters were set.
    """
    filters = whitening_filters(images, conv.kernel_size[0], eps)
    count = min(conv.out_channels // 2, len(filters))
    weight = conv.weight.data
    weight[:count] = filters[:count].to(weight)
    weight[count:2 * count] = -filters[:count].to(weight)
    return 2 * count


def fold_whitening(mixing: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """The 3x3 filters (out, C, 3, 3) equal to whitening (C*9 filters) then 1x1 `mixing`."""
    return torch.einsum("om,mchw->ochw", mixing.flatten(1), whitening.to(mixing.dtype))


class WhitenedConv2d(nn.Module):
    """A 3x3 conv re-parametrised as a fixed whitening conv (C*9 filters) then a trained 1x1.

    The 1x1 `mixing` weights (out x C*9) are exactly as many as the 3x3 conv's, and the two
    fold into one 3x3 conv (`folded_weight`), which is also how the forward pass runs: same
    maths as two convs, one conv's cost. Training the mixing weights instead of the filters
    preconditions the first layer on decorrelated inputs.
    """

    def __init__(self, whitening: torch.Tensor, out_channels: int) -> None:
        super().__init__()
        self.register_buffer("whitening", whitening.clone())
        conv = nn.Conv2d(len(whitening), out_channels, 1, bias=False)  # torch's default init
        self.mixing = nn.Parameter(conv.weight.data.clone())

    def folded_weight(self) -> torch.Tensor:
        """The equivalent 3x3 filters (out, C, 3, 3)."""
        return fold_whitening(self.mixing, self.whitening)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.folded_weight(), padding=1)

    def forward_unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The same output as `forward`, computed as whitening conv then 1x1 conv."""
        whitened = nn.functional.conv2d(x, self.whitening.to(x.dtype), padding=1)
        return nn.functional.conv2d(whitened, self.mixing)


def whiten_prep_(model: CustResNet, images: torch.Tensor, eps: float) -> WhitenedConv2d:
    """Replace the prep conv by its whitening re-parametrisation, fitted to `images`."""
    conv = model.prep.layers[0]
    whitened = WhitenedConv2d(whitening_filters(images, 3, eps), conv.out_channels)
    model.prep.layers[0] = whitened.to(conv.weight.device)
    return whitened


def plain_state_dict(model_or_state: nn.Module | dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """The state dict of plain `CustResNet`: a whitened prep conv folded back into 3x3 filters.

    Takes a model or a saved state dict (a checkpoint's), so old and new weights load alike.
    """
    state = dict(model_or_state.state_dict() if isinstance(model_or_state, nn.Module)
                 else model_or_state)
    for key in [key for key in state if key.endswith(".mixing")]:
        prefix = key[:-len("mixing")]
        mixing, whitening = state.pop(key), state.pop(prefix + "whitening")
        state[prefix + "weight"] = fold_whitening(mixing.detach(), whitening.detach()).clone()
    return state


@torch.no_grad()
def dirac_init_(model: nn.Module) -> int:
    """Start each 3x3 conv's first in-channel filters as the identity (a pass-through).

    Returns how many convs were set; a conv with fewer filters than inputs is left alone.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and (
                module.out_channels >= module.in_channels):
            nn.init.dirac_(module.weight.data[:module.in_channels])
            count += 1
    return count


def zero_init_residuals_(model: CustResNet) -> None:
    """Zero the last BN scale of each residual branch: every block starts as the identity."""
    for block in (model.layer1, model.layer3):
        if block.residual is not None:
            batch_norm = [m for m in block.residual.modules() if isinstance(m, nn.BatchNorm2d)][-1]
            nn.init.zeros_(batch_norm.weight)


def build_model(config: TrainConfig, device: torch.device,
                whitening_images: torch.Tensor | None = None, num_classes: int = 10,
                width_divisor: int = 1) -> nn.Module:
    """CustResNet on the device, channels-last when asked, BN settings and initialisation set.

    `num_classes` is the data's (its metadata's class names), so the saved weights fit it.
    `whitening_images` (normalised train images) fit `whiten` / `whiten_init`.
    `width_divisor` narrows the plan (the data-selection proxy's quarter width).
    """
    model = CustResNet(num_classes=num_classes, dropout=config.dropout,
                       logit_scale=config.logit_scale, width=CUSTRESNET_WIDTH // width_divisor)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum, module.eps = config.bn_momentum, config.bn_eps
            module.weight.requires_grad_(not config.bn_frozen_scale)  # stays a parameter at 1
    if config.dirac_init:
        dirac_init_(model)
    needs_images = config.whiten or config.whiten_init
    if needs_images and whitening_images is None:
        raise FastCifarError("whitening needs train images to fit")
    if config.whiten_init:
        whitening_init_(model.prep.layers[0], whitening_images)
    if config.whiten:
        whiten_prep_(model, whitening_images, config.whiten_eps)
    if config.zero_init_residual:
        zero_init_residuals_(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class ReceptiveFieldRow:
    """One layer of the receptive-field table: rf and jump after the layer, start of first centre."""

    name: str
    kernel: int
    stride: int
    padding: int
    receptive_field: int
    jump: int
    start: float


def _spatial_layers(model: CustResNet) -> list[tuple[str, bool, int, int, int]]:
    """(name, is_pool, kernel, stride, padding) of each layer that changes the RF, in order."""
    def first(value: int | tuple[int, ...]) -> int:
        return value if isinstance(value, int) else value[0]

    layers: list[tuple[str, bool, int, int, int]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.AdaptiveMaxPool2d):  # global: kernel and stride 0 = whole map
            layers.append((name, True, 0, 0, 0))
        elif isinstance(module, nn.Conv2d | nn.MaxPool2d):
            layers.append((name, isinstance(module, nn.MaxPool2d), first(module.kernel_size),
                           first(module.stride), first(module.padding)))
    return layers


def receptive_field_table(model: CustResNet, pools_widen: bool = False) -> list[ReceptiveFieldRow]:
    """Receptive field per layer along the deepest path (the residual branches included).

    Recurrence: rf += (k - 1) * jump; start += ((k - 1) / 2 - p) * jump; jump *= s. By default a
    2x2 max-pool only multiplies the jump, the convention of the original design spreadsheet, which
    gives the documented 81; `pools_widen=True` also adds its (k - 1) * jump (the exact pixel
    extent, 88). The final global pool is taken at a 32 px input, where it is a 4x4 pool
    covering its whole window either way.
    """
    rows = [ReceptiveFieldRow("input", 1, 1, 0, 1, 1, 0.5)]
    for name, is_pool, kernel, stride, padding in _spatial_layers(model):
        last = rows[-1]
        if kernel == 0:  # the global pool: the whole final map of a 32 px input
            kernel = stride = SUMMARY_INPUT_SIZE // last.jump
        downsampling_pool = is_pool and kernel == 2
        widening = 0 if (downsampling_pool and not pools_widen) else (kernel - 1) * last.jump
        rows.append(ReceptiveFieldRow(
            name=name, kernel=kernel, stride=stride, padding=padding,
            receptive_field=last.receptive_field + widening,
            jump=last.jump * stride,
            start=last.start + ((kernel - 1) / 2 - padding) * last.jump,
        ))
    return rows


def receptive_field(model: CustResNet, pools_widen: bool = False) -> int:
    """Receptive field (pixels) of one output of the final pooling layer (81, or 88 exact)."""
    return receptive_field_table(model, pools_widen)[-1].receptive_field


# The input side the summary and the receptive field are stated for (CIFAR-10's own).
SUMMARY_INPUT_SIZE = 32


def summary(model: nn.Module, batch_size: int = 1, device: str = "cpu"):
    """torchinfo summary with the columns of the original notebook (returns a ModelStatistics)."""
    from torchinfo import summary as torchinfo_summary

    return torchinfo_summary(
        model, input_size=(batch_size, 3, SUMMARY_INPUT_SIZE, SUMMARY_INPUT_SIZE), device=device, verbose=0,
        col_names=("input_size", "output_size", "num_params", "kernel_size", "params_percent"),
        row_settings=("var_names",),
        depth=SUMMARY_DEPTH,
    )


# Deep enough for every conv (block -> ConvLayer -> Sequential -> Conv2d): torchinfo's default
# of 3 showed the kernel of the prep conv only.
SUMMARY_DEPTH = 6
# torchinfo 1.8 names its units by their Enum (TylerYep/torchinfo#350): "(Units.MEGABYTES)".
_UNIT_NAMES = {"NONE": "", "KILOBYTES": "k", "MEGABYTES": "M", "GIGABYTES": "G", "TERABYTES": "T"}


def summary_text(model: nn.Module, batch_size: int = 1) -> str:
    """The summary as printed, with the mult-adds' unit as a plain prefix ("(M)")."""
    import re

    return re.sub(r"\(Units\.([A-Z]+)\)", lambda found: f"({_UNIT_NAMES.get(found[1], found[1])})",
                  str(summary(model, batch_size)))


def summary_record(model: CustResNet, batch_size: int = 1) -> dict:
    """JSON-friendly summary: parameter totals, torchinfo's rows and the receptive-field rows."""
    from dataclasses import asdict

    statistics = summary(model, batch_size)
    names = {id(module): name for name, module in model.named_modules()}
    layers = [{
        "name": names.get(id(layer.module)) or type(model).__name__,
        "type": layer.class_name,
        "depth": layer.depth,
        "input_size": layer.input_size,
        "output_size": layer.output_size,
        "params": layer.num_params,  # this layer's and those inside it
        "kernel_size": layer.kernel_size,
    } for layer in statistics.summary_list]
    rows = receptive_field_table(model)
    return {
        "total_params": statistics.total_params,
        "trainable_params": statistics.trainable_params,
        "mult_adds": statistics.total_mult_adds,
        "input_size": [batch_size, 3, SUMMARY_INPUT_SIZE, SUMMARY_INPUT_SIZE],
        "layers": layers,
        "receptive_field": rows[-1].receptive_field,
        "receptive_field_rows": [asdict(row) for row in rows],
    }
