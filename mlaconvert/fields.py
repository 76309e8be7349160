"""Settings dataclasses' fields: declared with their help (`setting`), the one place the command line reads each
option's default and help from (mlaconvert.cli_options); and values read from files (recipes, config.json)
checked against the type hints of the dataclass they fill, so a wrong type is one line naming the file and the key
instead of a TypeError deep inside the job."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from mlaconvert.errors import MlaconvertError


def setting(default: Any, help: str, *, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field with its default and its help (units included); `parse` reads the value from the text of
    a command-line option, for a type that is not a plain number, string or repeatable option."""
    return dataclasses.field(default=default, metadata={"help": help, **({"parse": parse} if parse else {})})


def help_of(cls: type, name: str) -> str:
    """The help of another dataclass's field, for a setting that passes its value on (finetune's --steps is the
    sampler's)."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): ""}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in args)
    if hint in (bool, str, type(None)):
        return type(value) is hint
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)  # TOML/JSON true is not 1
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, h) for v, h in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return isinstance(value, dict)  # a nested dataclass checks its own fields
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(d for d in (_describe(h) for h in args) if d)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return _NAMES.get(hint, "a table" if origin is dict or dataclasses.is_dataclass(hint) else str(hint))


def check_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Every value whose key is a field of the dataclass `cls` must fit that field's type hint."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _matches(value, hints[key]):
            raise MlaconvertError(f"{where}: {key} = {value!r} should be {_describe(hints[key])}")
