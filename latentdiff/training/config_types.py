"""The types `TrainConfig` declares, enforced for configs built in Python.

The command line and config files go through `HfArgumentParser`, which converts and checks every value; a
`TrainConfig(...)` call gets whatever it is given, and a wrong type would otherwise train silently wrong
(`use_ema="False"` is true, `validation_prompts="a cat"` is five one-letter prompts) or fail deep inside torch.
"""

import dataclasses
import os
import types
import typing
from typing import Any, Literal

# The largest integer option taken: counts beyond it overflow C integers deep in torch, numpy or datetime (with a
# traceback that names no option), and it is also the largest seed numpy takes.
LARGEST_INT = 2**32 - 1


def check_field_types(config: Any) -> None:
    """Check every field of the dataclass `config` against its annotation, in place, with the harmless
    conversions a caller means: a path for a string, an int for a float, one string for a list of strings."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        setattr(config, field.name, _checked(field.name, value, hints[field.name]))


def _checked(name: str, value: Any, annotation: Any) -> Any:
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None`
        if value is None:
            return None
        annotation = next(option for option in options if option is not type(None))
        options = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in options:
            raise ValueError(f"--{name} must be one of {list(options)}, got {value!r}.")
        return value
    if origin is list:
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"--{name} must be a list of strings, got {value!r}.")
        return [_checked(name, item, options[0]) for item in items]
    if annotation is bool and not isinstance(value, bool):
        raise ValueError(f"--{name} must be True or False, got {value!r}.")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"--{name} must be an integer, got {value!r}.")
    if annotation is int and value > LARGEST_INT:
        raise ValueError(f"--{name} must be at most {LARGEST_INT} (2**32 - 1), got {value!r}.")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--{name} must be a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"--{name} must be a string, got {value!r}.")
    return value
