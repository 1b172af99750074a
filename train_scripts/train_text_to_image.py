#!/usr/bin/env python
"""Fine-tune a latent text-to-image model: `accelerate launch train_scripts/train_text_to_image.py --help`.

The arguments are those of diffusers' examples/text_to_image/train_text_to_image.py (plus --caption_dropout,
--cache_latents, --train_text_encoder, --unet_config, ...), generated from `latentdiff.training.TrainConfig`;
a .yaml/.json path as the first argument reads them from that file (flags after it override it). Runs with
`python` too (one process), and with `torchrun --nproc_per_node N` (data-parallel, also on CPUs). See
docs/training.md.

It runs `latentdiff train` (its usage and errors name this file): a bad argument, file or model ends the run with
one `error: ...` line (exit status 2) instead of a traceback.
"""

import sys
from pathlib import Path

from latentdiff.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)], train_prog=Path(__file__).name)


if __name__ == "__main__":
    sys.exit(main())
