"""Command-line options made from settings dataclasses, the way litgpt makes its CLI from signatures: each
setting's default and help live once, in its field (`fields.setting`), and every command that offers the
setting builds its option from there.

    @app.command()
    @with_options
    def eval_(model: str = typer.Argument(...), sampler: dict = options(SamplerOptions, "chunk", "window")): ...

The command receives in `sampler` the options given on the command line, by field name, and nothing for the
others: what is left out keeps the dataclass's default, or a recipe's value where the command reads one.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import typer

# The parameter through which typer hands the wrapper click's context, which knows the options given.
CONTEXT = "settings_context"
# Where an option's value came from when nobody gave it (click's ParameterSource names).
NOT_GIVEN = ("DEFAULT", "DEFAULT_MAP")


@dataclass(frozen=True)
class Options:
    """The default of a command's parameter that stands for options: fields of `settings` (all of them when none
    is named), each `--field-name` unless `flags` declares it (e.g. "--steps", "--x/--no-x")."""

    settings: type
    names: tuple[str, ...]
    flags: Mapping[str, str]

    def fields(self) -> list[dataclasses.Field]:
        by_name = {f.name: f for f in dataclasses.fields(self.settings)}
        return [by_name[name] for name in self.names or by_name]


def options(settings: type, *names: str, **flags: str) -> Any:
    """Options for these fields of the settings dataclass `settings`; see the module's docstring."""
    return Options(settings, names, flags)


def with_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with each `options(...)` parameter spread into one typer option per field, for typer to read;
    `option_fields` maps each spread parameter to its (dataclass, field name)."""
    hints = typing.get_type_hints(command, include_extras=True)  # keeps Annotated options
    params: list[inspect.Parameter] = []
    spread: dict[str, Options] = {}
    sources: dict[str, tuple[type, str]] = {}
    for p in inspect.signature(command).parameters.values():
        if not isinstance(p.default, Options):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))
            continue
        spread[p.name] = p.default
        field_hints = typing.get_type_hints(p.default.settings)
        for f in p.default.fields():
            name = f"{p.name}__{f.name}"
            annotation, option = _option(f, field_hints[f.name], p.default.flags.get(f.name))
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
            sources[name] = (p.default.settings, f.name)
    params.append(inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        ctx = values.pop(CONTEXT)
        for param, group in spread.items():
            values[param] = {}
            for f in group.fields():
                value = values.pop(f"{param}__{f.name}")
                source = ctx.get_parameter_source(f"{param}__{f.name}")
                if source is not None and source.name not in NOT_GIVEN:
                    values[param][f.name] = _value(f, value)
        return command(**values)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.option_fields = sources  # type: ignore[attr-defined]
    return run


def _option(f: dataclasses.Field, hint: Any, flag: str | None) -> tuple[Any, Any]:
    """The annotation and typer.Option of one field: its default and help, under `flag` or --field-name."""
    kind, optional = _kind(hint, "parse" in f.metadata)
    default = f.default
    if kind is str and default is not None:
        default = str(default)
    elif isinstance(default, tuple):
        default = list(default)
    if flag is None:
        flag = "--" + f.name.replace("_", "-")
        if kind is bool and default:
            flag += f"/--no-{f.name.replace('_', '-')}"
    annotation = Optional[kind] if optional else kind
    show = not (default is None or default is False or default == "" or default == [])
    return annotation, typer.Option(default, *flag.split(), help=f.metadata["help"], show_default=show)


def _kind(hint: Any, text: bool) -> tuple[Any, bool]:
    """How the command line takes a field of type `hint`: a plain type, a repeatable option (list), or text that
    the field's `parse` reads (also for types typer cannot take, such as dc's int | list | str); and whether
    None is allowed."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [a for a in args if a is not type(None)]
    optional = len(kinds) < len(args)
    if text or len(kinds) != 1:
        return str, optional
    kind = kinds[0]
    if typing.get_origin(kind) in (tuple, list):
        return list[typing.get_args(kind)[0]], optional
    return (kind if kind in (bool, int, float, str) else str), optional


def _value(f: dataclasses.Field, value: Any) -> Any:
    """A given option's value as the field holds it."""
    if "parse" in f.metadata:
        return f.metadata["parse"](value)
    return tuple(value) if isinstance(value, list) else value
