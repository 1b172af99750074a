#!/usr/bin/env python
"""Fine-tune a latent text-to-image model: `accelerate launch train_scripts/train_text_to_image.py --help`.

The arguments are those of diffusers' examples/text_to_image/train_text_to_image.py (plus --caption_dropout,
--cache_latents, --train_text_encoder, --unet_config, ...), generated from `latentdiff.training.TrainConfig`;
a single .yaml/.json path instead of flags reads them from that file. Runs with `python` too (one process),
and with `torchrun --nproc_per_node N` (data-parallel, also on CPUs). See docs/training.md.
"""

import logging
import sys

from latentdiff.training import parse_train_args, train


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    train(parse_train_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
