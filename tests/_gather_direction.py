"""Helper for tests/test_reward.py: run under `accelerate launch --multi_gpu --num_processes 2` on CPU.

Each rank takes its slice of one fixed set of text embeddings (rank 0: rows 0-3, rank 1: rows
4-5, so the local batches differ in size), computes the common direction with
`CommonDirection` in `batch` and `ema` mode and, with the tiny preference model (PREFERENCE), the
`w = auto` of `decomposed_reward` for its own prompts and images (rank 0: 3 prompts, rank 1: 1);
it writes the results to OUT/rank{R}.safetensors.
"""

import sys
import warnings

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from longalign.reward import CommonDirection, decomposed_reward, load_preference_model

PROMPTS = ["A red circle. A blue square.", "Two cats sleep.", "A tall tree; a small house.", "Rain falls on a lake."]


def main(out: str, preference: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(0)
    full = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator) + 1.0, dim=-1)
    second = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator) - 0.5, dim=-1)
    rows = slice(0, 4) if rank == 0 else slice(4, 6)

    batch_v = CommonDirection("batch", accelerator)(full[rows])
    ema = CommonDirection("ema", accelerator, ema_decay=0.9)
    ema(full[rows])
    ema_v = ema(second[rows])

    one_each = CommonDirection("batch", accelerator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single_v = one_each(full[rank : rank + 1])  # one prompt per rank = two prompts globally
    warned = float(any("degenerate" in str(w.message) for w in caught))

    prompts = PROMPTS[:3] if rank == 0 else PROMPTS[3:]
    images = torch.rand(len(prompts), 3, 48, 48, generator=torch.Generator().manual_seed(rank))
    scorer = load_preference_model(preference)
    _, logs = decomposed_reward(scorer, images, prompts, CommonDirection("batch", accelerator), "auto")
    etas = scorer.embed_texts(prompts) @ CommonDirection("batch", accelerator)(scorer.embed_texts(prompts))

    save_file(
        {
            "auto_weight": torch.tensor([logs["text_irrelevant_weight"]], dtype=torch.float64),
            "etas": etas.contiguous(),
            "batch": batch_v.contiguous(),
            "ema": ema_v.contiguous(),
            "one_each": single_v.contiguous(),
            "warned": torch.tensor([warned]),
            "world": torch.tensor([float(accelerator.num_processes)]),
        },
        f"{out}/rank{rank}.safetensors",
    )
    accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
