"""`latentdiff demo|train|generate|push|tokenizer`: thin argument parsing over the library.

The only module that prints. Bad input surfaces as one ``error: …`` line and exit status 2, not a traceback.
"""

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from .argparse_errors import OneLineErrors

# Errors that mean "the input was wrong", worded for the user by the code that raised them.
# FloatingPointError: training stopped on a NaN/inf loss, with the step named.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, FloatingPointError)  # OSError: missing files, no network


def _generate(args: argparse.Namespace) -> None:
    from .generate import generate_images

    if args.lora_scale is not None and args.lora is None:
        raise ValueError("--lora-scale sets the strength of --lora: give the adapters with --lora as well.")
    result = generate_images(
        args.model,
        args.prompt,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        num_images_per_prompt=args.num_images,
        height=args.height,
        width=args.width,
        output_dir=args.output_dir,
        device=args.device,
        torch_dtype=args.dtype,
        lora=args.lora,
        lora_scale=1.0 if args.lora_scale is None else args.lora_scale,
        clip_skip=args.clip_skip,
        variant=args.variant,
    )
    for path in result.image_paths:
        print(path)
    print(f"grid: {result.grid_path}")


def _tokenizer_build(args: argparse.Namespace) -> None:
    from .tokenizer import build_clip_tokenizer

    if not args.out_dir.strip() or Path(args.out_dir).is_file():  # "" would be the current folder
        raise ValueError(f"{args.out_dir!r} is {'a file' if args.out_dir.strip() else 'empty'}: give the tokenizer's "
                         "folder (it is created if missing).")  # fmt: skip
    build_clip_tokenizer(args.out_dir)
    print(f"CLIP tokenizer written to {args.out_dir}")


def _train(argv: list[str], prog: str) -> None:
    from .training import parse_train_args, train

    output_dir = train(parse_train_args(argv, prog=prog))
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process returns here; one says it
        print(f"model saved to {output_dir}")


def _demo(args: argparse.Namespace) -> None:
    from .cpu_threads import use_free_cores
    from .demo import run_demo

    use_free_cores()
    output_dir = args.output_dir or Path("outputs/demo-lora" if args.lora_rank else "outputs/demo")
    result = run_demo(args.preset, output_dir, args.rebuild_base, lora_rank=args.lora_rank)
    print(result.summary())


def _push(args: argparse.Namespace) -> None:
    from .hub import push_to_hub

    repo_id = push_to_hub(args.folder, args.repo_id, token=args.token)
    print(f"pushed {args.folder} to the Hub repo {repo_id}")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {text!r}")
    return int(text)


class CommandParser(OneLineErrors, argparse.ArgumentParser):
    """The `latentdiff` parser and its sub-commands' (argparse makes those of the same class)."""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="latentdiff", description="Latent text-to-image diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="fine-tune the embedded emoji model end to end and write a grid")
    demo.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="training budget (default: cpu)")
    demo.add_argument("--output-dir", type=Path, default=None, help="default: outputs/demo (outputs/demo-lora with --lora-rank)")
    demo.add_argument("--rebuild-base", action="store_true", help="retrain the tiny base model instead of the committed one")
    demo.add_argument("--lora-rank", type=_positive_int, default=None, help="fine-tune LoRA adapters of this rank instead")
    demo.set_defaults(handler=_demo)

    commands.add_parser(
        "train",
        help="fine-tune a model (the options of train_scripts/train_text_to_image.py; `latentdiff train --help`)",
        add_help=False,
    )

    generate = commands.add_parser("generate", help="generate images from a saved model folder or Hub id")
    generate.add_argument("--model", required=True, help="pipeline folder or Hub id")
    generate.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    generate.add_argument("--negative-prompt", default=None, help="what to steer away from, for every prompt")
    generate.add_argument("--scheduler", default="ddim",
                          help="ddim, ddpm, pndm, euler, euler_a, heun, dpm++, dpm++_karras or unipc (default: ddim)")
    generate.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    generate.add_argument("--guidance-scale", type=float, default=7.5,
                          help="classifier-free guidance; 1 or less turns it off (default: 7.5)")
    generate.add_argument("--seed", type=int, default=0, help="image k (over all prompts) uses seed + k (default: 0)")
    generate.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    generate.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    generate.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    generate.add_argument("--output-dir", type=Path, default=Path("outputs/generated"),
                          help="gets NNN-<prompt>-seed<S>.png and grid.png (default: outputs/generated)")
    generate.add_argument("--device", default=None, help="default: cuda when available, else mps, else cpu")
    generate.add_argument("--variant", default=None,
                          help="weights variant, e.g. fp16 for a model stored as *.fp16.safetensors only")
    generate.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="weights' dtype (default: fp32)")
    generate.add_argument("--clip-skip", type=int, default=None,
                          help="condition on the text encoder's layer this many before the last (1 or 2 for models "
                               "tuned so; default: the last)")  # fmt: skip
    generate.add_argument("--lora", default=None, help="LoRA adapters on top of --model: folder, .safetensors or Hub id")
    generate.add_argument("--lora-scale", type=float, default=None,
                          help="strength of --lora, 0 gives the base model (default: 1)")
    generate.set_defaults(handler=_generate)

    push = commands.add_parser("push", help="upload a saved pipeline or LoRA folder to the Hugging Face Hub")
    push.add_argument("folder", type=Path)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--token", default=None, help="default: the HF_TOKEN environment variable or saved login")
    push.set_defaults(handler=_push)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    build = tokenizer_commands.add_parser("build", help="write SD's CLIP tokenizer from open-clip-torch's vocabulary")
    build.add_argument("out_dir")
    build.set_defaults(handler=_tokenizer_build)
    return parser


def _not_the_torchvision_notice(record: logging.LogRecord) -> bool:
    """transformers announces, on every command, that CLIP's image processor falls back from torchvision to PIL:
    latentdiff uses no image processor and installs no torchvision on purpose (it does not import beside the
    CPU torch), so the notice says nothing to act on."""
    return "requires torchvision (not installed)" not in record.getMessage()


# Libraries that print through a stderr handler of their own and pass each record on to the root logger too:
# under the CLI's root handler every one of their warnings (the Hub's retries, say) came out twice.
SELF_PRINTING_LOGGERS = ("huggingface_hub", "datasets")


@contextlib.contextmanager
def _each_record_printed_once() -> Iterator[None]:
    """Take the self-printing libraries' own stderr handlers off while the command runs (their records reach the
    root handler, formatted like ours and kept above the progress bars), and put them back after it."""
    removed = [(logger, handler) for logger in map(logging.getLogger, SELF_PRINTING_LOGGERS) if logger.propagate
               for handler in logger.handlers if type(handler) is logging.StreamHandler]  # fmt: skip
    for logger, handler in removed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for logger, handler in removed:
            logger.addHandler(handler)


def main(argv: list[str] | None = None, train_prog: str = "latentdiff train") -> int:
    """Run one command; returns the exit status. `train_prog` names the training command in its usage and errors
    (the training script gives its own file name)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("latentdiff").setLevel(logging.INFO)
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_the_torchvision_notice)
    try:
        with _each_record_printed_once(), logging_redirect_tqdm():  # log lines above the progress bars
            if argv[:1] == ["train"]:  # its options come from TrainConfig, parsed by HfArgumentParser
                _train(argv[1:], train_prog)
                return 0
            args = build_parser().parse_args(argv)
            args.handler(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (checkpoints already written are complete: continue with --resume_from_checkpoint latest)"
        print(f"interrupted{resume if argv[:1] == ['train'] else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
