"""A training config file (YAML or JSON) turned into command-line flags.

Going through the flags gives a file the command line's type conversion, choices and required-option checks,
with the same one-line errors, and lets flags after the file override it
(`latentdiff train base.yaml --output_dir run2`: one base file for several runs; the later value wins, as on any
command line).
"""

import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def config_file_flags(path: str | Path, config_class: type) -> list[str]:
    r"""The flags that a YAML/JSON file of `config_class` option names and values stands for.

    Args:
        path (`str` or `Path`): The file: a mapping of option names (as in `--help`, without `--`) to values.
        config_class (`type`): The dataclass the flags are for (`TrainConfig`): its fields are the known options.

    Raises:
        `FileNotFoundError`: No such file. `ValueError`: Not valid YAML/JSON, not a mapping, an unknown option
            name, a value that is not a string, number, boolean or list, or a list for a one-value option.
    """
    path = Path(path)
    options = _read_mapping(path)
    types = typing.get_type_hints(config_class)
    if unknown := sorted(set(options) - {field.name for field in fields(config_class)}):
        raise ValueError(
            f"Training config file {path}: unknown option(s) {unknown}. The keys are the options of --help "
            "without the leading --."
        )
    flags = []
    for name, value in options.items():
        if value is None or value == []:
            continue  # the option's default
        if isinstance(value, bool) and types[name] is not bool:
            value = "yes" if value else "no"  # YAML reads a bare no/yes/off/on as a boolean: `mixed_precision: no`
        if isinstance(value, bool):
            flags.append(f"--{name}={'true' if value else 'false'}")
        elif isinstance(value, (str, int, float)):
            flags.append(f"--{name}={value}")  # `=`: a value that starts with '-' stays a value
        elif isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
            if not _takes_list(types[name]):
                raise ValueError(f"Training config file {path}: {name} takes one value, got the list {value!r}.")
            items = [str(item) for item in value]
            # argparse takes an item like "--b" for an option (one with a space in it stays a value), and no '=' can
            # say otherwise for the items of a list
            if flag_like := next((item for item in items if item.startswith("-") and " " not in item), None):
                raise ValueError(
                    f"Training config file {path}: the {name} item {flag_like!r} would be read as a command-line "
                    "option (it starts with '-'): reword it."
                )
            flags += [f"--{name}", *items]
        else:
            raise ValueError(
                f"Training config file {path}: {name} must be a string, number, boolean or list of them, got {value!r}."
            )
    return flags


def _takes_list(hint: Any) -> bool:
    """Whether a field's type is a list (`list[str]`, `list[str] | None`), so that the option takes several values."""
    return typing.get_origin(hint) is list or any(typing.get_origin(arg) is list for arg in typing.get_args(hint))


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Training config file {path} does not exist.")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        options = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"Training config file {path} is not valid {kind}: {' '.join(str(error).split())}") from None
    if options is None:  # an empty file: every option at its default
        return {}
    if not isinstance(options, dict):
        raise ValueError(
            f"Training config file {path} must map option names to values (`resolution: 512`), "
            f"got a {type(options).__name__}."
        )
    return options
