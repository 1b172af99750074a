"""The fine-tuning command line: `parse_train_args` turns flags (after an optional config file) into a
`TrainConfig`, with one-line errors that name the config file when the bad value is the file's, and advice for
diffusers' options that are spelled otherwise here."""

import difflib
import re
import sys
from typing import Any, NoReturn

from transformers import HfArgumentParser

from ..argparse_errors import OneLineErrors
from .config import TrainConfig
from .config_file import CONFIG_SUFFIXES, config_file_flags

# The value argparse rejected, in its messages for a bad type, a bad choice and (transformers') a bad boolean.
REJECTED_VALUE = re.compile(r"argument (--[\w-]+).*?(?:invalid choice: '(.*?)'|invalid \w+ value: '(.*?)'|got (.*?) but expected)")


class TrainArgumentParser(OneLineErrors, HfArgumentParser):
    """`HfArgumentParser` whose errors are one line, naming the config file when the bad value came from it."""

    def __init__(
        self,
        config_file: str | None = None,
        file_values: dict[str, str] | None = None,
        command_line_options: set[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(TrainConfig, **kwargs)
        for action in self._actions:  # HfArgumentParser gives a True-by-default flag's `--no_` twin the same help
            if negated := next((flag for flag in action.option_strings if flag.startswith("--no_")), None):
                action.help = f"Turn off --{negated.removeprefix('--no_')}."
        self.config_file = config_file
        self.file_values = file_values or {}  # option name → the value the file gives it
        self.command_line_options = command_line_options or set()  # option names given again after the file

    def error(self, message: str) -> NoReturn:
        if self._value_from_file(message):
            message = f"{self.config_file}: {message}"
        super().error(message)

    def _value_from_file(self, message: str) -> bool:
        """Whether the rejected value is the file's: the file sets the option to it and the command line does not."""
        match = REJECTED_VALUE.search(message)
        if not match:
            return False
        name, rejected = _option_name(match.group(1)), next(value for value in match.groups()[1:] if value is not None)
        return self.set_by_file(name) and self.file_values[name] == rejected

    def set_by_file(self, name: str) -> bool:
        """Whether the config file sets option `name` and the command line does not set it again."""
        return name in self.file_values and name not in self.command_line_options


# Options of diffusers' training scripts that are not ours, with what to do instead.
DIFFUSERS_OPTIONS_NOT_TAKEN = {
    "non_ema_revision": "deprecated in diffusers: use --variant non_ema",
    "local_rank": "accelerate launch and torchrun give each process its rank in the environment: launch with one "
                  "of them, not python -m torch.distributed.launch",  # fmt: skip
    "rank": "the LoRA rank is --lora_rank here",
    "proportion_empty_prompts": "the share of empty captions is --caption_dropout here",
    "ema_max_decay": "the EMA's maximum decay is --ema_decay here",
    "ddpm_beta_schedule": "the noise schedule is --beta_schedule here",
    "model_config_name_or_path": "a UNet config to train from scratch is --unet_config here",
}


def _unknown_option_hint(flag: str, known: list[str]) -> str:
    """`flag` with what to use instead: our advice for a diffusers option we do not take, else the nearest option."""
    if advice := DIFFUSERS_OPTIONS_NOT_TAKEN.get(_option_name(flag)):
        return f"{flag} ({advice})"
    match = difflib.get_close_matches(flag, known, n=1)
    return f"{flag} (did you mean {match[0]}?)" if match else flag


def _option_name(flag: str) -> str:
    """`--image-interpolation-mode=x` → `image_interpolation_mode`: argparse accepts both spellings."""
    return flag.split("=", 1)[0].lstrip("-").replace("-", "_")


def parse_train_args(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    r"""Build a `TrainConfig` from command-line arguments, which may start with a `.yaml`/`.yml`/`.json` file.

    The file's options come first and the flags after it override them (`config_file.py`).

    Args:
        argv (`list[str]`, *optional*): The arguments, e.g. `["--pretrained_model_name_or_path", "x", ...]`,
            `["config.yaml"]` or `["config.yaml", "--output_dir", "run2"]`; defaults to `sys.argv[1:]`.
        prog (`str`, *optional*): The command named in usage and errors; defaults to the script's name.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file, file_values, command_line_options = None, {}, set()
    if argv and argv[0].endswith(CONFIG_SUFFIXES):
        config_file, flags = argv[0], config_file_flags(argv[0], TrainConfig)
        file_values = dict(flag[2:].split("=", 1) for flag in flags if flag.startswith("--") and "=" in flag)
        command_line_options = {_option_name(flag) for flag in argv[1:] if flag.startswith("--")}
        argv = flags + argv[1:]
    parser = TrainArgumentParser(
        config_file,
        file_values,
        command_line_options,
        prog=prog,
        description="Fine-tune a latent text-to-image diffusion model.",
    )
    try:
        config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # TrainConfig's own checks: name the file when the value is the file's
        option = re.match(r"--(\w+)", str(error))
        if option and parser.set_by_file(option.group(1)):
            raise ValueError(f"{config_file}: {error}") from None
        raise
    if unknown:
        flags = [flag for action in parser._actions for flag in action.option_strings]
        hints = [_unknown_option_hint(flag, flags) for flag in unknown if flag.startswith("-")]
        parser.error(f"unrecognized arguments: {' '.join(hints or unknown)}")
    return config
