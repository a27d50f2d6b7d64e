"""Convert a released LongAlign LoRA (`*_lora_vis.pt`, `sd15-reward-3750.pt`) to diffusers' format.

`python -m longalign.convert_lora IN.pt OUT_DIR [--pretrained_model SD15_ID_OR_FOLDER]` writes
`OUT_DIR/pytorch_lora_weights.safetensors` (METHOD.md §3). The released files are key-less lists
`[up_0, down_0, up_1, down_1, ...]` whose order follows the UNet's module walk, so only the UNet's
architecture is needed: it is built from `unet/config.json` on the meta device (no weights are
read or downloaded). The output loads with `StableDiffusionPipeline.load_lora_weights(OUT_DIR)`
and with `longalign.lora.load_stage_loras([OUT_DIR])`.
"""

from __future__ import annotations

import argparse
import json

from .loading import UserError, cli_entry, fetch_file
from .lora import convert_legacy_lora, lora_file_path, read_legacy_list, write_lora

DEFAULT_PRETRAINED_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def meta_unet(pretrained_model: str = DEFAULT_PRETRAINED_MODEL):
    """A `UNet2DConditionModel` built from `pretrained_model`'s `unet/config.json` on the meta device.

    Only the architecture (module names and weight shapes) is real; no weights are loaded.
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    path = fetch_file(pretrained_model, "unet/config.json", "UNet config")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"could not read UNet config '{path}': {error}") from None
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, convert, write, and print the output file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="released list-format LoRA file (.pt)")
    parser.add_argument("output_dir", help="folder to write pytorch_lora_weights.safetensors into")
    parser.add_argument(
        "--pretrained_model",
        default=DEFAULT_PRETRAINED_MODEL,
        help="SD1.5 hub id or local pipeline folder whose unet/config.json defines the UNet architecture",
    )
    args = parser.parse_args(argv)
    items = read_legacy_list(lora_file_path(args.input))  # refuse a bad input before fetching the config
    weights = convert_legacy_lora(items, meta_unet(args.pretrained_model), name=args.input)
    path = write_lora(weights, args.output_dir)
    modules = len(weights.state_dict) // 2
    print(f"wrote {path} ({modules} modules, rank {weights.config['r']})")


if __name__ == "__main__":
    cli_entry(main)()
