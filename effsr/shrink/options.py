"""Settings declared once: each field of a settings dataclass carries the command-line option that sets it.

``calib_images: int = setting(64, flag="--calib-images", type=int, metavar="N", help="...")`` is a
:func:`dataclasses.field` whose metadata holds an :class:`Option`. From the dataclass, :func:`add_options`
adds the argparse arguments (in field order), :func:`from_args` builds the dataclass from the parsed
arguments and :func:`flags` maps each field to its flag. The field's default is the command line's too,
unless the option gives its own (``cli_default=``) or converts the parsed value (``convert=``: then argparse's
default is ``cli_default`` or argparse's own).

Errors name settings with :func:`arg`: ``SettingError(f"{arg('calib_images')} must be ...")`` reads
``calib_images must be ...`` (the API's argument) and, from :meth:`SettingError.with_flags`, ``--calib-images
must be ...`` (the command line's flag).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Option", "setting", "like", "inverted", "option_of", "flags", "add_options", "from_args", "arg",
           "either", "marked", "SettingError", "SettingTypeError"]


@dataclasses.dataclass(frozen=True)
class Option:
    """How the command line sets one field: its flag and argparse's keyword arguments."""

    flag: str
    #: argparse's keyword arguments (help, metavar, type, action, nargs, required, default)
    arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: the parsed value -> the field's value (e.g. ``--y-float`` -> ``y_round = not value``)
    convert: Callable[[Any], Any] | None = None
    #: who adds the argument when :func:`add_options` does not (options several commands share, or one a
    #: command words itself); the flag still names the field in errors
    added_by: str | None = None

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in."""
        return self.flag.lstrip("-").replace("-", "_")


def setting(default: Any = dataclasses.MISSING, *, flag: str, default_factory: Any = dataclasses.MISSING,
            cli_default: Any = dataclasses.MISSING, convert: Callable[[Any], Any] | None = None,
            added_by: str | None = None, **arguments: Any) -> Any:
    """A dataclass field with ``default`` (or ``default_factory``) set on the command line by ``flag``;
    ``arguments`` are argparse's (``help``, ``metavar``, ``type``, ...), ``cli_default`` argparse's default when
    it is not ``default`` (argparse's own when ``convert`` is given and it is not)."""
    if cli_default is not dataclasses.MISSING:
        arguments["default"] = cli_default
    elif default is not dataclasses.MISSING and convert is None:
        arguments["default"] = default
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"option": Option(flag, arguments, convert, added_by)})


def inverted(value: bool) -> bool:
    """The ``convert`` of a flag that turns a setting off (``--no-progress``: ``progress=False``)."""
    return not value


def like(cls: type, name: str) -> Any:
    """A new field with the default and the option of ``cls``'s field ``name`` (a setting two dataclasses share)."""
    f = _field(cls, name)
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise ValueError(f"name: {cls.__name__} has no field {name!r}")


def option_of(f: dataclasses.Field) -> Option | None:
    """The option of field ``f`` (None: not set on the command line)."""
    return f.metadata.get("option")


def flags(cls: type) -> dict[str, str]:
    """``{field name: flag}`` of every field of ``cls`` with an option."""
    return {f.name: opt.flag for f in dataclasses.fields(cls) if (opt := option_of(f)) is not None}


def add_options(parser: argparse.ArgumentParser, cls: type,
                before: Mapping[str, Callable[[argparse.ArgumentParser], None]] | None = None) -> None:
    """Add the argument of every field of ``cls`` with an option to ``parser``, in field order (fields whose
    option is ``added_by`` someone else are left out). ``before``: {field name: adder of the command's own
    arguments to place before that field's}."""
    for f in dataclasses.fields(cls):
        if before and f.name in before:
            before[f.name](parser)
        opt = option_of(f)
        if opt is not None and opt.added_by is None:
            parser.add_argument(opt.flag, **opt.arguments)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` from parsed arguments: each field with an option takes its argument's value (converted), a field
    in ``given`` that value, the others their defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        opt = option_of(f)
        if f.name in given:
            values[f.name] = given[f.name]
        elif opt is not None:
            value = getattr(args, opt.dest)
            values[f.name] = opt.convert(value) if opt.convert is not None else value
    unknown = set(given) - set(values)
    if unknown:
        raise TypeError(f"given: {cls.__name__} has no field {', '.join(sorted(unknown))}")
    return cls(**values)


# ------------------------------------------------------------------------------------------ errors
# Control characters mark names and alternatives in a template (repr() escapes them, and no path holds one).
_NAME, _API, _CLI = "\x00", "\x01", "\x02"
_MARKED = re.compile(f"{_NAME}([A-Za-z_][A-Za-z0-9_]*){_NAME}")
_EITHER = re.compile(f"{_API}([^{_API}{_CLI}]*){_CLI}([^{_API}{_CLI}]*){_API}")


def arg(name: str) -> str:
    """``name`` marked as a setting's name inside a :class:`SettingError` message."""
    return f"{_NAME}{name}{_NAME}"


def either(api: str, cli: str) -> str:
    """Words of a :class:`SettingError` message that differ between the API (``None``) and the command line
    (``'auto'``)."""
    return f"{_API}{api}{_CLI}{cli}{_API}"


def _render(template: str, table: Mapping[str, str] | None) -> str:
    text = _EITHER.sub(lambda m: m.group(1 if table is None else 2), template)
    return _MARKED.sub(lambda m: m.group(1) if table is None else table.get(m.group(1), m.group(1)), text)


def marked(text: str, table: Mapping[str, str]) -> str:
    """``text`` with each flag of ``table`` ({field: flag}) it names marked as that field (:func:`arg`): a
    message worded for the command line made into a :class:`SettingError` template."""
    by_flag = {flag: field for field, flag in table.items()}
    if not by_flag:
        return text
    pattern = "|".join(re.escape(f) for f in sorted(by_flag, key=len, reverse=True))
    return re.sub(f"({pattern})(?![\\w-])", lambda m: arg(by_flag[m.group(1)]), text)


class _NamesSettings:
    """A message naming settings: ``str()`` names them as the API's arguments, :meth:`with_flags` as flags."""

    template: str

    def __init__(self, template: str) -> None:
        super().__init__(_render(template, None))
        self.template = template

    def with_flags(self, table: Mapping[str, str]) -> str:
        """The message naming each setting by its flag in ``table`` ({field: flag}; a field not in it by its name)."""
        return _render(self.template, table)

    def renamed(self, names: Mapping[str, str]) -> Any:
        """The same error with settings renamed (``{old field: new field}``)."""
        return type(self)(_MARKED.sub(lambda m: arg(names.get(m.group(1), m.group(1))), self.template))


class SettingError(_NamesSettings, ValueError):
    """A setting's value is wrong (see :class:`_NamesSettings`)."""


class SettingTypeError(_NamesSettings, TypeError):
    """A setting's type is wrong (see :class:`_NamesSettings`)."""
