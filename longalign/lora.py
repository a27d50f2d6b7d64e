"""UNet LoRA through peft: targets, training adapters, diffusers-format files, stage stacking (METHOD.md §3).

Every stage trains a rank-32 LoRA (scale 1, dropout 0.1, `lora_A ~ N(0, std 1/r)`, `lora_B = 0`)
on every `nn.Linear` / `nn.Conv2d` inside the UNet's `ResnetBlock2D`, `Attention` and `GEGLU`
modules (224 modules on SD1.5). Stage outputs are `pytorch_lora_weights.safetensors` files in
diffusers' format with the peft adapter config as metadata, so a stock
`StableDiffusionPipeline.load_lora_weights(folder)` loads them at the right scale. Later stages
stack or fuse earlier ones (`load_stage_loras`, `fuse_stage_loras`); LoRA deltas add, so
stacking adapters at scale 1 equals fusing them in order. The released LongAlign files
(`*_lora_vis.pt`, `sd15-reward-3750.pt`) are key-less lists of tensors; `convert_legacy_lora`
turns them into the same diffusers format by the released module order.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .loading import UserError, check_folder_path, error_line, fetch_file, resolve_source, split_hub_path

LORA_TARGET_CLASSES = ("ResnetBlock2D", "Attention", "GEGLU")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LEGACY_SUFFIXES = (".pt", ".pth")
_UNET_PREFIX = "unet."
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass
class LoraSettings:
    """Hyper-parameters of one UNet LoRA (METHOD.md §3 / released launcher: rank 32, scale 1).

    `alpha=None` means `alpha = rank` (peft scale `alpha / rank = 1`, as in the released code).
    `init="gaussian"` is peft's `lora_A ~ N(0, std = 1/rank)`, `lora_B = 0`, the initialisation of
    the released LoRA layers, so a new adapter starts as the identity edit. `dropout` acts on the
    branch's output, `dropout(B(A(x)))`, as in the released layers; `add_lora` adds it, because
    peft's `lora_dropout` drops the branch's input (`B(A(dropout(x)))`) and is 0 in `lora_config`.
    """

    rank: int = field(default=32, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale 1)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA branch's output, as released"})
    init: str = field(default="gaussian", metadata={"help": "peft init_lora_weights: gaussian | true"})

    def lora_config(self, target_modules: Sequence[str]):
        """The peft `LoraConfig` for these settings on the given qualified module names."""
        from peft import LoraConfig

        if self.rank < 1:
            raise UserError(f"LoRA rank must be at least 1, got {self.rank}")
        init: Any = True if self.init.lower() == "true" else self.init
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank if self.alpha is None else self.alpha,
            lora_dropout=0.0,  # `add_lora` drops the branch's output instead, as released
            init_lora_weights=init,
            target_modules=list(target_modules),
        )


@dataclass
class LoraWeights:
    """A UNet LoRA in memory: peft-format tensors plus the adapter config that fixes its scale.

    `state_dict` keys are `<qualified module name>.lora_A.weight` (shape (r, in) or (r, in, k, k))
    and `<name>.lora_B.weight` (shape (out, r) or (out, r, 1, 1)), without diffusers' `unet.`
    prefix; Delta W = (alpha / r) lora_B @ lora_A. `config` is `LoraConfig` keyword arguments
    (JSON types), or None when a file carried no metadata (diffusers then infers alpha = r).
    """

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None


# --------------------------------------------------------------------------------------------
# Targets


def _walk_layers(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for each Linear/Conv2d in `block.named_modules()` order.

    A peft LoRA wrapper counts as the layer it wraps and is not descended into, so the walk is the
    same on a UNet that already carries adapters (the released code skipped its injected layers
    the same way).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped: list[str] = []
    for name, module in block.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module


def lora_target_modules(unet: nn.Module) -> list[str]:
    """Qualified names of the LoRA targets of `unet`, in the released (legacy file) order.

    Rule (METHOD.md §3, literally): walk `unet.named_modules()`; for each module whose class name
    is `ResnetBlock2D`, `Attention` or `GEGLU`, walk its `named_modules()` and take every
    `nn.Linear` / `nn.Conv2d`. On SD1.5 this gives 224 names (resnets: conv1, time_emb_proj, conv2,
    conv_shortcut; attentions: to_q, to_k, to_v, to_out.0; GEGLU: proj). If the target classes
    nested, a layer would be reached twice and the released list format would be ambiguous;
    no diffusers UNet2DConditionModel nests them, and this function refuses one that does.
    """
    names: list[str] = []
    for prefix, block in unet.named_modules():
        if type(block).__name__ in LORA_TARGET_CLASSES:
            names.extend(f"{prefix}.{name}" if prefix else name for name, _ in _walk_layers(block))
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(f"LoRA target classes nest in this UNet: '{repeated[0]}' is reached twice")
    return names


def _base_layer(unet: nn.Module, name: str) -> nn.Module | None:
    """The Linear/Conv2d at `name` (through a peft wrapper), or None if the UNet has no such module."""
    try:
        module = unet.get_submodule(name)
    except AttributeError:
        return None
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    return module


# --------------------------------------------------------------------------------------------
# Training adapters


def _unet_of(target: Any) -> nn.Module:
    """The UNet of a pipeline, or `target` itself when it is a UNet."""
    return target.unet if hasattr(target, "unet") else target


def _active_adapters(unet: nn.Module) -> list[str]:
    """Names of the adapters currently active anywhere in `unet`, in the order they were added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = {name for module in unet.modules() if isinstance(module, BaseTunerLayer) for name in module.active_adapters}
    return [name for name in getattr(unet, "peft_config", {}) if name in active]


def _adapter_of(parameter_name: str) -> str | None:
    """The adapter a peft LoRA parameter belongs to (`...to_q.lora_A.<adapter>.weight`), else None."""
    if ".lora_A." in parameter_name or ".lora_B." in parameter_name:
        return parameter_name.rsplit(".", 2)[-2]
    return None


def _activate(unet: nn.Module, adapter_names: list[str], trainable: str | None, frozen: Sequence[str] = ()) -> None:
    """Activate `adapter_names` at scale 1 and set which LoRA parameters train.

    peft's `set_adapter` marks every active adapter trainable, so gradients are set explicitly
    afterwards: the `trainable` adapter trains, the `frozen` adapters do not, and every other
    parameter keeps the `requires_grad` it had before.
    """
    before = {name for name, param in unet.named_parameters() if param.requires_grad}
    unet.set_adapters(adapter_names, [1.0] * len(adapter_names))
    for name, param in unet.named_parameters():
        owner = _adapter_of(name)
        if owner is not None and owner == trainable:
            param.requires_grad_(True)
        elif owner is not None and owner in frozen:
            param.requires_grad_(False)
        else:
            param.requires_grad_(name in before)


@contextlib.contextmanager
def _several_adapters_expected() -> Iterator[None]:
    """Silence peft's warning about a second adapter on one model: stacking stages is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def _check_adapter_name(adapter_name: str, unet: nn.Module) -> None:
    """Refuse a name peft cannot store (it becomes a key of an `nn.ModuleDict`) or one already in use."""
    if not adapter_name.isidentifier() or hasattr(nn.ModuleDict(), adapter_name):
        raise UserError(f"invalid LoRA adapter name '{adapter_name}': use an identifier that is not an nn.Module attribute")
    if adapter_name in getattr(unet, "peft_config", {}):
        raise UserError(f"the UNet already has a LoRA adapter named '{adapter_name}'")


def _drop_branch_output(lora_B: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return lora_B.branch_dropout(output)


def _add_branch_dropout(unet: nn.Module, adapter_name: str, p: float) -> None:
    """Dropout(p) on the output of each LoRA branch of `adapter_name`, `dropout(B(A(x)))`, as the
    released LoRA layers apply it (METHOD.md §3).

    Each is the `branch_dropout` child of the branch's `lora_B` module, applied by a forward hook on
    it: it holds no parameters (the state dict is unchanged) and follows the UNet's train/eval mode.
    peft's merge reads `lora_B.weight`, not its forward, so fusing is unaffected.
    """
    from peft.tuners.lora import LoraLayer

    for layer in unet.modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_B:
            up = layer.lora_B[adapter_name]
            up.branch_dropout = nn.Dropout(p)
            up.register_forward_hook(_drop_branch_output)


def add_lora(unet: nn.Module, adapter_name: str = "default", settings: LoraSettings | None = None) -> list[nn.Parameter]:
    """Add a trainable peft LoRA adapter on `lora_target_modules(unet)` and return its parameters.

    Everything else in the UNet is frozen (stage adapters already stacked stay active at scale 1,
    frozen). The new adapter's parameters are fp32 even when the UNet is bf16/fp16 (mixed-precision
    training keeps the trainable weights in full precision; peft casts the activations).
    Returns the trainable parameters: 2 per target module, (r, in[, k, k]) and (out, r[, 1, 1]).
    """
    settings = settings or LoraSettings()
    _check_adapter_name(adapter_name, unet)
    previously_active = _active_adapters(unet)
    unet.requires_grad_(False)
    with _several_adapters_expected():
        unet.add_adapter(settings.lora_config(lora_target_modules(unet)), adapter_name=adapter_name)
    _activate(unet, previously_active + [adapter_name], trainable=adapter_name)
    if settings.dropout > 0:
        _add_branch_dropout(unet, adapter_name, settings.dropout)
    unet.train(unet.training)  # the injected Dropout modules follow the UNet's train/eval mode
    trainable = [param for param in unet.parameters() if param.requires_grad]
    drawn_in_low_precision = any(param.dtype != torch.float32 for param in trainable)
    for param in trainable:
        param.data = param.data.float()
    if drawn_in_low_precision:  # peft drew the init, then cast it to the base layers' bf16/fp16: draw again in fp32
        from peft.tuners.lora import LoraLayer

        init = unet.peft_config[adapter_name].init_lora_weights
        for module in unet.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                module.reset_lora_parameters(adapter_name, init)
    return trainable


def lora_weights(unet: nn.Module, adapter_name: str = "default") -> LoraWeights:
    """The adapter `adapter_name` of `unet` as `LoraWeights` (peft keys, its LoraConfig as metadata).

    The metadata's `lora_dropout` is 0: dropout is a training setting (kept in the stage's
    config.json), and peft injects fresh Dropout modules in train mode, so a stock pipeline
    loading a file with dropout 0.1 would give random outputs.
    """
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise UserError(f"the UNet has no LoRA adapter named '{adapter_name}'")
    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    config = _json_config(unet.peft_config[adapter_name].to_dict())
    config["lora_dropout"] = 0.0  # an inference artefact: loaders add fresh Dropout modules in train mode
    return LoraWeights(state_dict, config)


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """A LoraConfig dict in the JSON types the safetensors metadata stores (sets -> sorted lists)."""

    def default(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"not JSON serialisable: {value!r}")

    return json.loads(json.dumps(config, default=default))


def write_lora(weights: LoraWeights, folder: str | os.PathLike) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` in diffusers' format; returns the file path.

    Keys get diffusers' `unet.` prefix and the adapter config is stored as `lora_adapter_metadata`
    (written by `StableDiffusionPipeline.save_lora_weights`), so stock diffusers loads it at the
    scale alpha / r it was trained with.
    """
    from diffusers import StableDiffusionPipeline

    check_folder_path(str(folder), "LoRA output folder")  # a file: diffusers would log an error and write nothing
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=weights.state_dict,
        unet_lora_adapter_metadata=dict(weights.config) if weights.config else None,
    )
    return Path(folder) / LORA_WEIGHT_NAME


def save_lora(unet: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Save adapter `adapter_name` of `unet` to `folder/pytorch_lora_weights.safetensors` (diffusers format).

    Pass the unwrapped UNet (`accelerator.unwrap_model`). The file loads with a stock
    `StableDiffusionPipeline.load_lora_weights(folder)` and with `load_stage_loras([folder])`.
    """
    return write_lora(lora_weights(unet, adapter_name), folder)


# --------------------------------------------------------------------------------------------
# Reading LoRA files


def lora_file_path(source: str | os.PathLike) -> str:
    """Local path of the LoRA file that `source` names: a file, a folder holding
    `pytorch_lora_weights.safetensors`, or a hub `org/repo[/folder][/file]` (downloaded). A missing
    file is a `UserError` naming it."""
    source = str(source)
    resolved = resolve_source(source, "LoRA")
    if os.path.isfile(resolved):
        return resolved
    if os.path.isdir(resolved):
        return fetch_file(resolved, LORA_WEIGHT_NAME, "LoRA file")
    repo, inner = split_hub_path(resolved)
    if inner is not None and inner.endswith((".safetensors",) + LEGACY_SUFFIXES):
        return fetch_file(repo, inner, "LoRA file")
    return fetch_file(resolved, LORA_WEIGHT_NAME, "LoRA file")


def _strip_unet_prefix(items: dict[str, Any], path: str, what: str) -> dict[str, Any]:
    """Drop diffusers' `unet.` prefix; refuse keys of other components (e.g. a text-encoder LoRA)."""
    if not any(key.startswith(_UNET_PREFIX) for key in items):
        return dict(items)
    others = [key for key in items if not key.startswith(_UNET_PREFIX)]
    if others:
        raise UserError(f"LoRA file '{path}' has {what} for '{others[0]}'; only UNet LoRAs are supported")
    return {key[len(_UNET_PREFIX) :]: value for key, value in items.items()}


def read_safetensors_lora(path: str) -> LoraWeights:
    """Read a diffusers/peft-format LoRA `.safetensors` file (with or without adapter metadata)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"could not read LoRA file '{path}': {error_line(error)}") from None
    state_dict = _strip_unet_prefix(state_dict, path, "weights")
    if state_dict and not any(".lora_A." in key or ".lora_B." in key for key in state_dict):
        from diffusers.utils import convert_unet_state_dict_to_peft

        state_dict = convert_unet_state_dict_to_peft(state_dict)
    for key in state_dict:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"LoRA file '{path}' is not a diffusers UNet LoRA: unexpected key '{key}'")
    if not state_dict:
        raise UserError(f"LoRA file '{path}' holds no LoRA weights")
    config = json.loads(metadata[_METADATA_KEY]) if metadata.get(_METADATA_KEY) else None
    if config is not None:
        config = _strip_unet_prefix(config, path, "metadata")
    return LoraWeights(state_dict, config)


def read_lora(source: str | os.PathLike, unet: nn.Module | None = None) -> LoraWeights:
    """Read a stage LoRA from a folder holding `pytorch_lora_weights.safetensors`, a `.safetensors`
    file, or a released list-format `.pt` file (converted on the fly for `unet`'s architecture).

    A folder without the file, an unreadable file, or (for `.pt`) a list that does not fit `unet`
    raises `UserError` with one line naming the problem.
    """
    path = lora_file_path(source)
    if path.endswith(LEGACY_SUFFIXES):
        if unet is None:
            raise UserError(f"converting the released LoRA '{path}' needs the UNet it belongs to")
        return convert_legacy_lora(path, unet)
    return read_safetensors_lora(path)


def check_lora_fits(unet: nn.Module, weights: LoraWeights, source: str) -> None:
    """Refuse (`UserError`, one line) a LoRA that names a module the UNet lacks or whose shapes do not fit.

    For a Linear (out, in): lora_A (r, in), lora_B (out, r). For a Conv2d (out, in, k, k):
    lora_A (r, in, k, k), lora_B (out, r, 1, 1). Works on a meta-device UNet (shapes only).
    """
    modules = sorted({key.rsplit(".", 2)[0] for key in weights.state_dict})
    for name in modules:
        down = weights.state_dict.get(f"{name}.lora_A.weight")
        up = weights.state_dict.get(f"{name}.lora_B.weight")
        if down is None or up is None:
            half = "lora_B" if up is None else "lora_A"
            raise UserError(f"LoRA '{source}' has no {half} weight for module '{name}'")
        layer = _base_layer(unet, name)
        if layer is None:
            raise UserError(f"LoRA '{source}' does not fit the UNet: the UNet has no module '{name}'")
        expected = _expected_shapes(layer, down.shape[0])
        if expected is None:
            raise UserError(
                f"LoRA '{source}' does not fit the UNet: module '{name}' is a {type(layer).__name__}, not a Linear or Conv2d"
            )
        if (tuple(down.shape), tuple(up.shape)) != expected:
            raise UserError(
                f"LoRA '{source}' does not fit the UNet: module '{name}' (weight {tuple(layer.weight.shape)}) "
                f"needs lora_A {expected[0]} and lora_B {expected[1]}, got {tuple(down.shape)} and {tuple(up.shape)}"
            )
    config = weights.config or {}
    if config.get("r") and not config.get("rank_pattern"):
        ranks = {weights.state_dict[f"{name}.lora_A.weight"].shape[0] for name in modules}
        if ranks != {config["r"]}:
            raise UserError(f"LoRA '{source}' metadata says rank {config['r']} but its weights have rank {sorted(ranks)}")


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(lora_A shape, lora_B shape) that a rank-`rank` LoRA on `layer` must have; None if unsupported."""
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, nn.Conv2d):
        return (rank, layer.in_channels // layer.groups, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return None


# --------------------------------------------------------------------------------------------
# Released list-format files


def read_legacy_list(path: str) -> list[torch.Tensor]:
    """Load a released LoRA file: a `torch.save`d list of tensors `[up_0, down_0, up_1, down_1, ...]`.

    Read with `torch.load(weights_only=True)`; anything that is not a list/tuple of tensors is
    refused with a one-line `UserError`.
    """
    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip / weights_only errors come in many classes
        reason = error_line(error, 200)
        if "Weights only load failed" in reason:  # torch's advice to drop weights_only would be unsafe
            reason = "not a torch.save file of plain tensors"
        raise UserError(f"could not read released LoRA '{path}' with torch.load(weights_only=True): {reason}") from None
    if not isinstance(items, (list, tuple)):
        already = "; a diffusers-format LoRA loads as it is" if isinstance(items, dict) and any("lora" in str(k) for k in items) else ""
        raise UserError(f"released LoRA '{path}' is not a list of tensors (it holds a {type(items).__name__}{already})")
    for index, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise UserError(f"released LoRA '{path}': item {index} is a {type(item).__name__}, not a tensor")
    return list(items)


def convert_legacy_lora(source: str | Sequence[torch.Tensor], unet: nn.Module, name: str | None = None) -> LoraWeights:
    """Convert a released list-format LoRA to `LoraWeights` (diffusers/peft format) for `unet`.

    `source` is a `.pt` path or the loaded list `[up_0, down_0, up_1, down_1, ...]`; pair i belongs
    to `lora_target_modules(unet)[i]` (the released module order). `up` (out, r) or (out, r, 1, 1)
    becomes peft `lora_B`, `down` (r, in) or (r, in, k, k) becomes `lora_A`; Delta W = up @ down at
    scale 1, so the metadata has `r = lora_alpha = ` the tensors' rank. Tensors keep their dtype
    (fp16 in the released files). A wrong count, a shape that does not fit a module, or mixed
    ranks raise `UserError` naming what did not fit. `unet` may live on the meta device.
    """
    where = name or (source if isinstance(source, str) else "list")
    items = read_legacy_list(lora_file_path(source)) if isinstance(source, str) else list(source)
    targets = lora_target_modules(unet)
    if len(items) != 2 * len(targets):
        raise UserError(
            f"released LoRA '{where}' does not fit this UNet: expected {2 * len(targets)} tensors "
            f"(up and down for {len(targets)} modules), got {len(items)}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for index, module_name in enumerate(targets):
        up, down = items[2 * index], items[2 * index + 1]
        layer = _base_layer(unet, module_name)  # a Linear or Conv2d, by the walk
        expected = _expected_shapes(layer, down.shape[0] if down.ndim else -1)
        if (tuple(down.shape), tuple(up.shape)) != expected:
            raise UserError(
                f"released LoRA '{where}' does not fit UNet module '{module_name}' "
                f"(weight {tuple(layer.weight.shape)}): "
                f"tensors {2 * index} (up) and {2 * index + 1} (down) have shapes {tuple(up.shape)} and "
                f"{tuple(down.shape)}, expected {expected[1]} and {expected[0]} with one rank r"
            )
        state_dict[f"{module_name}.lora_A.weight"] = down.detach().contiguous()
        state_dict[f"{module_name}.lora_B.weight"] = up.detach().contiguous()
    ranks = sorted({state_dict[f"{module}.lora_A.weight"].shape[0] for module in targets})
    if len(ranks) > 1:
        raise UserError(f"released LoRA '{where}' mixes ranks {ranks}; one rank per file is supported")
    rank = ranks[0] if ranks else 1
    settings = LoraSettings(rank=rank, alpha=rank, dropout=0.0)
    return LoraWeights(state_dict, _json_config(settings.lora_config(targets).to_dict()))


# --------------------------------------------------------------------------------------------
# Stacking and fusing stage LoRAs


def load_stage_loras(
    target: Any,
    sources: Sequence[str | os.PathLike],
    fuse: bool = False,
    adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Apply earlier stages' LoRAs to a UNet or pipeline, in order, each at scale 1 (METHOD.md §3).

    `sources`: folders with `pytorch_lora_weights.safetensors` (our stage outputs, e.g.
    `runs/align-x/final`), `.safetensors` files, or released `.pt` list files (converted on the
    fly). `fuse=False` stacks them as named frozen adapters (`adapter_names`, default `stage_0`,
    `stage_1`, ...) next to any adapters already active; `fuse=True` merges them into the base
    weights one after another and removes the LoRA layers (W <- W + up @ down per file), which
    needs a UNet without adapters. Both give the same function up to rounding. Returns the names
    of the stacked adapters ([] when fused). Every file is checked against the UNet first, so a
    misfit is a one-line `UserError` naming the module and shapes.
    """
    unet = _unet_of(target)
    sources = [str(source) for source in sources]
    names = list(adapter_names) if adapter_names is not None else [f"stage_{i}" for i in range(len(sources))]
    if len(names) != len(sources):
        raise UserError(f"got {len(sources)} LoRA sources but {len(names)} adapter names")
    existing = list(getattr(unet, "peft_config", {}))
    if fuse and existing:
        raise UserError(f"fuse stage LoRAs before adding other adapters; the UNet already has {existing}")
    for name in names:
        _check_adapter_name(name, unet)
    if len(set(names)) != len(names):
        raise UserError(f"adapter names must differ, got {names}")
    all_weights = [read_lora(source, unet) for source in sources]
    for source, weights in zip(sources, all_weights):
        check_lora_fits(unet, weights, source)
    previously_active = [] if fuse else _active_adapters(unet)
    for name, weights in zip(names, all_weights):
        config = None if weights.config is None else {**weights.config, "lora_dropout": 0.0}  # frozen: no dropout
        with _several_adapters_expected():
            unet.load_lora_adapter(dict(weights.state_dict), adapter_name=name, metadata=config, prefix=None)
    if fuse:
        if sources:  # loading an adapter unmerges merged ones, so merge only after all are loaded
            unet.fuse_lora(lora_scale=1.0, adapter_names=names)  # merged one after another, in order
            unet.unload_lora()
        return []
    _activate(unet, previously_active + names, trainable=None, frozen=names)
    unet.train(unet.training)  # the injected modules follow the UNet's train/eval mode
    return names


def fuse_stage_loras(target: Any, sources: Sequence[str | os.PathLike]) -> None:
    """Fuse earlier stages' LoRAs permanently into the UNet, in order (W <- W + up @ down each).

    Used before training a new stage: `lcm` and `reward` train a new LoRA on a UNet with the
    `align` LoRA fused in, `reward_lcm` on align + lcm fused. Call it before `add_lora`.
    """
    load_stage_loras(target, sources, fuse=True)
