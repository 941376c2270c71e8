"""PastaNet: a Generic_UNet-style 3D U-Net backbone plus named task heads.

Backbone submodules carry the key names of the released PASTA network
(`conv_blocks_context`, `tu`, `conv_blocks_localization`) so PASTA_final.pth loads
one-to-one into the `paper` preset. Heads live under `heads.<task>` and nothing else
does, so "the heads" is a clean, allow-listable subset of the state dict.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from synth.vocabulary import HOST_ORGANS

from .heads import LEAKY_SLOPE, TASKS, build_head, check_task
from .presets import Preset, get_preset

HEADS_PREFIX = "heads."


class ConvNormNonlin(nn.Module):
    """Conv3d k3 p1 (bias) -> InstanceNorm3d(affine) -> LeakyReLU(0.01), as nnU-Net v1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=True)
        self.instnorm = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True, track_running_stats=False)
        self.lrelu = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lrelu(self.instnorm(self.conv(x)))


class StackedConvLayers(nn.Module):
    """`num_convs` conv blocks under `.blocks`; the first may downsample with stride 2."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, first_stride: int = 1):
        super().__init__()
        self.blocks = nn.Sequential(
            ConvNormNonlin(in_channels, out_channels, first_stride),
            *[ConvNormNonlin(out_channels, out_channels) for _ in range(num_convs - 1)],
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


@dataclass
class BackboneFeatures:
    pooled: Tensor            # [B, C_deep] deepest encoder stage, averaged over its central third (centre_pool)
    decoder: Tensor | None    # [B, base_features, D, H, W] last decoder stage (None if not decoded)


def centre_pool(x: Tensor) -> Tensor:
    """Average of [B, C, *S] over the central third of every spatial axis (at least one voxel).

    Why not PASTA's global average: each stage ends in InstanceNorm, which gives every
    channel the same spatial mean and spread in every crop, so a global average of the
    deepest stage is nearly the same vector for every crop (measured on the tiny net:
    across-case std 3.6 % of the mean). The heads then see no signal and sit at the
    majority class. Crops for the classification tasks are centred on the lesion, and
    the central features differ between cases by O(1) (measured: 117 %).
    """
    idx = []
    for n in x.shape[2:]:
        w = max(1, round(n / 3))
        w += (n - w) % 2                      # same parity as n: a window centred exactly
        start = (n - w) // 2
        idx.append(slice(start, start + w))
    return x[(slice(None), slice(None), *idx)].mean(dim=(2, 3, 4))


def head_input(task: str, feats: BackboneFeatures) -> Tensor:
    """The backbone output a task's head consumes."""
    check_task(task)
    if task == "segment":
        if feats.decoder is None:
            raise ValueError("the segment head needs decoder features; encode with decode=True")
        return feats.decoder
    return feats.pooled


def _he_init(module: nn.Module) -> None:
    # nnU-Net's InitWeights_He(neg_slope=1e-2).
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


ORGAN_HEAD_PREFIX = "organ_head."


class PastaNet(nn.Module):
    """`organs=True` adds a pointwise organ classifier on the decoder (background + every host organ), a
    probe of what the backbone knows of anatomy. It belongs to the backbone (in its SHA-256, frozen at
    the sites, never sent): only `heads.*` are fine-tuned and leave a site."""

    def __init__(self, preset: Preset, tasks: Sequence[str] = TASKS, organs: bool = False):
        super().__init__()
        tasks = list(tasks)
        for task in tasks:
            check_task(task)
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate tasks in {tasks}")
        self.preset = preset
        self.tasks: tuple[str, ...] = tuple(tasks)
        feats = preset.stage_features()
        bottleneck = preset.bottleneck_features

        context: list[nn.Module] = [StackedConvLayers(1, feats[0], 2, first_stride=1)]
        for i in range(1, preset.num_pools):
            context.append(StackedConvLayers(feats[i - 1], feats[i], 2, first_stride=2))
        context.append(nn.Sequential(
            StackedConvLayers(feats[-1], bottleneck, 1, first_stride=2),
            StackedConvLayers(bottleneck, bottleneck, 1),
        ))
        self.conv_blocks_context = nn.ModuleList(context)

        deeper = [bottleneck] + list(reversed(feats[1:]))   # input channels of tu.i
        skips = list(reversed(feats))                       # skip channels of decoder stage i
        self.tu = nn.ModuleList(
            nn.ConvTranspose3d(d, s, kernel_size=2, stride=2, bias=False) for d, s in zip(deeper, skips))
        self.conv_blocks_localization = nn.ModuleList(
            nn.Sequential(StackedConvLayers(2 * s, s, 1), StackedConvLayers(s, s, 1)) for s in skips)
        self.organ_names: tuple[str, ...] = HOST_ORGANS if organs else ()
        self.organ_head = nn.Conv3d(feats[0], len(HOST_ORGANS) + 1, kernel_size=1) if organs else None
        self.apply(_he_init)
        self.heads = nn.ModuleDict({task: build_head(task, preset) for task in tasks})

    # -- backbone -------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"input must have shape [B, 1, D, H, W], got {list(x.shape)}")
        bad = [int(s) for s in x.shape[2:] if s % self.preset.divisor]
        if bad:
            raise ValueError(f"spatial size {list(x.shape[2:])} must be divisible by "
                             f"{self.preset.divisor} (2**num_pools) in every dimension; pad the input")

    def encode(self, x: Tensor, decode: bool = True) -> BackboneFeatures:
        """Backbone features; decode=False runs only the encoder (all classification heads need)."""
        self._check_input(x)
        skips: list[Tensor] = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        pooled = centre_pool(skips[-1])
        if not decode:
            return BackboneFeatures(pooled=pooled, decoder=None)
        x = self.conv_blocks_context[-1](skips[-1])
        for up, local, skip in zip(self.tu, self.conv_blocks_localization, reversed(skips)):
            x = local(torch.cat((up(x), skip), dim=1))
        return BackboneFeatures(pooled=pooled, decoder=x)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Raw logits per task (report: all attribute groups concatenated)."""
        tasks = self.tasks if tasks is None else tuple(tasks)
        missing = [t for t in tasks if t not in self.heads]
        if missing:
            raise ValueError(f"model has no head for task(s) {missing}; it has {list(self.tasks)}")
        feats = self.encode(x, decode="segment" in tasks)
        return {task: self.heads[task](head_input(task, feats)) for task in tasks}

    def segment_and_organs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Lesion logits and organ logits (None without an organ head) from one decoder pass.

        The organ head reads the decoder through `detach()`: in the tiny preset (8 decoder channels) a
        shared organ loss took the features over and the lesion head learned nothing, even on one
        repeated batch (docs/model.md), so organs are a probe, not a training signal for the backbone."""
        decoder = self.encode(x, decode=True).decoder
        organs = self.organ_head(decoder.detach()) if self.organ_head is not None else None
        return self.heads["segment"](decoder), organs

    def organ_logits(self, x: Tensor) -> Tensor:
        """[B, 1 + len(organ_names), *S]: 0 = background, k = organ_names[k - 1]."""
        if self.organ_head is None:
            raise ValueError("this model has no organ head (built without organs=True)")
        return self.segment_and_organs(x)[1]

    def backbone_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if not name.startswith(HEADS_PREFIX):
                yield name, param

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.backbone_named_parameters():
            yield param

    def freeze_backbone(self) -> None:
        """Fine-tuning trains heads only: DP-SGD over the whole U-Net is not affordable."""
        for param in self.backbone_parameters():
            param.requires_grad_(False)


def build_model(preset: str | Preset, tasks: Sequence[str] = TASKS, organs: bool = False) -> PastaNet:
    return PastaNet(get_preset(preset), tasks, organs=organs)


def head_keys(state_dict_or_model: nn.Module | Mapping[str, object], task: str | None = None) -> list[str]:
    """State-dict keys of the heads (all of them, or those of one task)."""
    keys = state_dict_or_model.state_dict().keys() if isinstance(state_dict_or_model, nn.Module) \
        else state_dict_or_model.keys()
    if task is not None:
        check_task(task)
    prefix = HEADS_PREFIX if task is None else f"{HEADS_PREFIX}{task}."
    return [k for k in keys if k.startswith(prefix)]


def backbone_keys(state_dict_or_model: nn.Module | Mapping[str, object]) -> list[str]:
    keys = state_dict_or_model.state_dict().keys() if isinstance(state_dict_or_model, nn.Module) \
        else state_dict_or_model.keys()
    return [k for k in keys if not k.startswith(HEADS_PREFIX)]
