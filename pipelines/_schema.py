"""A small typed schema for stage options: each option is declared once, with its type,
range, default and help, and becomes both a command-line flag (``--max-iter``) and a key of
the ``pipelines.hubert`` config (``kmeans.max_iter``), checked the same way in both.

A kind turns a flag's text (:meth:`Kind.parse`) or a YAML value (:meth:`Kind.check`) into a
value, or raises :class:`ValueError` with a message that names what was expected and what
came. Rules that belong to the library (a size such as ``1GiB``, the sample, the k-means
parameters) are checked by the stages that call it, before Ray starts; the kinds check
types, plain ranges and the shapes of values.

Written here rather than with pydantic or jsonschema: one declaration must give an argparse
flag (with its help and metavar) and a YAML key alike, and ``unitpipe X --help`` must import
nothing heavy (it stays under 0.1 s); the kinds are a few dozen lines each.

Example:
    >>> Int(lo=1).check(5)
    5
    >>> Int(lo=1).parse("0")
    Traceback (most recent call last):
    ...
    ValueError: must be >= 1, got 0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any


class Kind:
    """A value's type; subclasses say what they accept in :attr:`expected`."""

    expected = "a value"

    def parse(self, text: str) -> Any:
        """The value of a flag's text."""
        return self.check(text)

    def check(self, value: Any) -> Any:
        """The value of a config entry (already read as YAML)."""
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """``value`` as a flag would spell it (for ``(default: ...)`` in help)."""
        return str(value)

    def _wrong(self, value: Any) -> ValueError:
        return ValueError(f"expected {self.expected}, got {_spell(value)}")


def _spell(value: Any) -> str:
    """A value as a YAML user reads it: ``null``, ``true``, ``'abc'``, ``5``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Int(Kind):
    """An integer in ``[lo, hi]`` (either end open when ``None``). A bool or a float is not
    an integer, even ``5.0``."""

    lo: int | None = None
    hi: int | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "an integer" + _range(self.lo, self.hi)

    def parse(self, text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise self._wrong(text) from None
        return self._in_range(value)

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(value)
        return self._in_range(value)

    def _in_range(self, value: int) -> int:
        if self.lo is not None and value < self.lo:
            raise ValueError(f"must be {_range(self.lo, self.hi).strip()}, got {value}")
        if self.hi is not None and value > self.hi:
            raise ValueError(f"must be {_range(self.lo, self.hi).strip()}, got {value}")
        return value


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" between {lo} and {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


@dataclasses.dataclass(frozen=True)
class Float(Kind):
    """A finite number ``> gt`` or ``>= ge``, and ``<= le`` (an integer is a number too)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    @property
    def expected(self) -> str:  # type: ignore[override]
        parts = [f"> {self.gt:g}" if self.gt is not None else None]
        parts += [f">= {self.ge:g}" if self.ge is not None else None]
        parts += [f"<= {self.le:g}" if self.le is not None else None]
        bounds = " and ".join(p for p in parts if p)
        return "a number" + (f" {bounds}" if bounds else "")

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise self._wrong(text) from None
        return self._in_range(value)

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(value)
        return self._in_range(float(value))

    def _in_range(self, value: float) -> float:
        if (
            not math.isfinite(value)
            or (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.le is not None and not value <= self.le)
        ):
            raise ValueError(f"must be {self.expected.removeprefix('a number ')}, got {value:g}")
        return value


class Bool(Kind):
    """``true`` or ``false`` (a flag that is given or not on the command line)."""

    expected = "true or false"

    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._wrong(value)
        return value


class Str(Kind):
    """A non-empty string; a YAML number is taken as its text (``name: 100``)."""

    expected = "a string"

    def check(self, value: Any) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise self._wrong(value)
        return value


@dataclasses.dataclass(frozen=True)
class Choice(Kind):
    """One of ``values``."""

    values: tuple[str, ...]

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.values)

    def check(self, value: Any) -> str:
        if value not in self.values:
            raise self._wrong(value)
        return value


@dataclasses.dataclass(frozen=True)
class Optional(Kind):
    """``null`` (the default that the library chooses), or a value of ``kind``."""

    kind: Kind

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"{self.kind.expected} or null"

    def parse(self, text: str) -> Any:
        return self.kind.parse(text)

    def check(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.kind.check(value)
        except ValueError as e:
            if str(e).startswith("expected "):
                raise self._wrong(value) from None
            raise


class StrList(Kind):
    """Strings: a YAML list, or one string with items separated by commas."""

    expected = "a list of strings (or one string with commas)"

    def parse(self, text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    def check(self, value: Any) -> list[str]:
        if isinstance(value, str):
            return self.parse(value) if "," in value else [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and v.strip() for v in value
        ):
            raise self._wrong(value)
        return list(value)

    def show(self, value: Any) -> str:
        return ",".join(value)


class Size(Kind):
    """A byte count, or its text with a unit (``1GiB``, ``500MB``); the stage reads the
    text with :func:`shards.plan.parse_size`."""

    expected = "a size such as 1GiB, 512MiB or a byte count"

    def check(self, value: Any) -> str | int:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self._wrong(value)
        return value


#: A split name becomes a file name (``{split}.tsv``, ``{split}.npy``): a dot would read as
#: an extension and a slash as a directory.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Splits(Kind):
    """Split names and their percents, ``train=99,valid=1`` or ``{train: 99, valid: 1}``:
    each name a plain file stem, given once; each percent positive; together 100. The same
    rule :func:`units.labels.fairseq.assign_splits` applies when it draws the splits (a sum
    within 1e-6 of 100), checked here before any work rather than after a whole pass."""

    expected = "NAME=PERCENT,... (for example train=99,valid=1)"

    def parse(self, text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in text.split(","):
            name, sep, percent = part.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ValueError(f"{part.strip()!r} is not NAME=PERCENT")
            if name in out:
                raise ValueError(f"split {name!r} is given twice")
            try:
                out[name] = float(percent)
            except ValueError:
                raise ValueError(f"{part.strip()!r}: {percent.strip()!r} is not a number") from None
        return self._valid(out)

    def check(self, value: Any) -> dict[str, float]:
        if isinstance(value, str):
            return self.parse(value)
        if not isinstance(value, dict) or not value:
            raise self._wrong(value)
        out = {}
        for name, percent in value.items():
            if isinstance(percent, bool) or not isinstance(percent, int | float):
                raise ValueError(f"split {name!r}: expected a percent, got {_spell(percent)}")
            out[str(name)] = float(percent)
        return self._valid(out)

    def show(self, value: Any) -> str:
        return ",".join(f"{name}={percent:g}" for name, percent in value.items())

    @staticmethod
    def _valid(percents: dict[str, float]) -> dict[str, float]:
        for name, percent in percents.items():
            if not _SPLIT_NAME.match(name):
                raise ValueError(
                    f"split name {name!r} must be letters, digits, '_' or '-' (it names "
                    f"the files {name}.tsv, {name}.km)"
                )
            if not (math.isfinite(percent) and percent > 0):
                raise ValueError(f"split {name!r}: percent must be > 0, got {percent:g}")
        total = sum(percents.values())
        if abs(total - 100) > 1e-6:
            shown = ",".join(f"{n}={p:g}" for n, p in percents.items())
            raise ValueError(f"split percents {shown} add up to {total:g}, not 100")
        return percents


REQUIRED = object()
"""The default of an option that the command line must give."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One stage option: a flag ``--KEY-WITH-DASHES`` and a config key ``KEY``.

    Attributes:
        kind: Its type (and range).
        default: Its value when not given; :data:`REQUIRED` when the flag must be given.
        help: One line for ``--help``; ``(default: ...)`` is added.
        metavar: The value's name in ``--help``.
    """

    kind: Kind
    default: Any = None
    help: str = ""
    metavar: str | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def flag(key: str) -> str:
    """``max_iter`` -> ``--max-iter``."""
    return "--" + key.replace("_", "-")


def _argparse_type(kind: Kind, key: str):
    def convert(text: str):
        try:
            return kind.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = key
    return convert


def add_option(container, key: str, option: Option, *, required: bool | None = None) -> None:
    """Adds ``option`` as ``--KEY`` to a parser, an argument group or a mutually exclusive
    group. A :class:`Bool` that defaults to false is a switch."""
    kind = option.kind
    required = option.required if required is None else required
    default = None if option.required else option.default
    if isinstance(kind, Bool):
        if default:
            raise ValueError(f"{key}: a switch must default to false")
        container.add_argument(flag(key), dest=key, action="store_true", help=option.help)
        return
    shown = ""
    if default is not None and not required:
        shown = f" (default: {kind.show(default)})"
    choices = kind.values if isinstance(kind, Choice) else None
    inner = kind.kind if isinstance(kind, Optional) else kind
    if isinstance(inner, Choice):
        choices = inner.values
    kwargs = dict(
        dest=key,
        type=_argparse_type(kind, key),
        default=default,
        help=option.help + shown,
        metavar=option.metavar or ("{" + ",".join(choices) + "}" if choices else None),
    )
    if required:
        kwargs["required"] = True
    container.add_argument(flag(key), **kwargs)


def add_options(container, options: dict[str, Option], *, skip: Iterable[str] = ()) -> None:
    """Adds every option of ``options`` but those in ``skip``, in order."""
    for key, option in options.items():
        if key not in skip:
            add_option(container, key, option)


def check_section(
    values: dict, options: dict[str, Option], where: str, defaults: dict | None = None
) -> dict:
    """Every key of ``options`` with its checked value: ``values`` over ``defaults`` over
    the options' own defaults.

    Raises:
        ValueError: A value of the wrong type or out of range, named ``WHERE.KEY`` (``KEY``
            when ``where`` is empty); an unknown key; a required key that is missing.
    """

    def named(key: str) -> str:
        return f"{where}.{key}" if where else key

    unknown = sorted(set(values) - set(options))
    if unknown:
        known = ", ".join(named(k) for k in sorted(options))
        raise ValueError(f"unknown key '{named(unknown[0])}'; known: {known}")
    out = {}
    for key, option in options.items():
        if key in values:
            value = values[key]
        elif defaults and key in defaults:
            value = defaults[key]
        elif option.required:
            raise ValueError(f"{named(key)} is required")
        else:
            value = option.default
        if value is None and not isinstance(option.kind, Optional):
            raise ValueError(f"{named(key)} is required ({option.kind.expected})")
        try:
            out[key] = option.kind.check(value)
        except ValueError as e:
            raise ValueError(f"{named(key)}: {e}") from None
    return out
