"""Options as dataclass fields: each field carries its help, its accepted forms and its choices.

Every config dataclass declares its fields with :func:`option` and calls :func:`check_fields`
first thing in ``__post_init__``. That one check reads text the way the command line does
("1GiB", "8", "0.5", "64,128"), turns a dict into a nested config, and refuses a value of
the wrong type or outside its choices with a one-line :class:`ConfigError`. So a config built
from Python (``LLM(kv_cache_memory="1GiB")``) and one built from the command line (whose
parser ``bucketserve.argparse_options`` generates from the same fields) accept the same values
and fail with the same messages. Pure Python: the scheduling core declares its options here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from bucketserve.errors import ConfigError

Choices = tuple[str, ...] | Callable[[], Iterable[str]]


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    name: str | None = None,
    choices: Choices | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    help: one line; the command line appends "(default: ...)" unless it already names a
      default. A None default must be explained here ("default: the model's context length").
    name: the option's name on the command line when it is not the field's (``--aging`` for
      ``aging_s``); dashes or underscores, without the leading ``--``.
    choices: the accepted strings, or a function returning them (read when checked).
    parse: reads the command line's text, and text given from Python (e.g. parse_bytes).
    """
    metadata = {"help": help, "name": name, "choices": choices, "parse": parse, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def one_of(what: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def item_word(name: str) -> str:
    """What one item of a list field is called: "policies" -> "policy", "rates" -> "rate"."""
    words = name.replace("_", " ")
    return words[:-3] + "y" if words.endswith("ies") else words.removesuffix("s")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# -- reading values ------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_bytes(text: str | int) -> int:
    """Parse '2GiB', '512MB', '1e9' or an int into a byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    try:
        value = float(num) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1000000") from None
    if value <= 0:
        raise ConfigError(f"size must be > 0, got {text!r}")
    return int(value)


def parse_int_list(text: str) -> tuple[int, ...]:
    """Parse '64,128,512' (an empty string is an empty list)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected integers separated by commas, got {text!r}") from None


def parse_float_list(text: str) -> tuple[float, ...]:
    """Parse '0.5,1,inf' (an empty string is an empty list)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"expected numbers separated by commas, got {text!r}") from None


def parse_str_list(text: str) -> tuple[str, ...]:
    """Parse 'bucket,static' (an empty string is an empty list)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as an integer") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a number") from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"cannot read {text!r} as true or false")


# -- the types a field may have --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a field holds, read once from its annotation: a scalar (bool, int, float, str), a
    tuple of ints, numbers or strings (``item``), or a nested config; ``optional`` when None
    is allowed."""

    kind: type
    optional: bool
    item: type = int  # a tuple's items

    @property
    def is_config(self) -> bool:
        return dataclasses.is_dataclass(self.kind)

    def text_parser(self, f: dataclasses.Field) -> Callable[[str], Any]:
        """How text becomes this field's value (the command line's ``type=``)."""
        custom = f.metadata.get("parse")
        if custom is not None:
            return custom
        if self.kind is tuple:
            return {int: parse_int_list, float: parse_float_list, str: parse_str_list}[self.item]
        return {bool: _parse_bool, int: _parse_int, float: _parse_float}.get(self.kind, str)


_TYPE_CACHE: dict[type, dict[str, FieldType]] = {}


def field_types(cls: type) -> dict[str, FieldType]:
    """Each field's :class:`FieldType`, from the class's (string) annotations."""
    if cls not in _TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        found = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            kinds = [a for a in args if a is not type(None)]
            kind, item = object, int  # Any, or a union of several types: taken as it is
            if len(kinds) == 1 and kinds[0] is not Any:
                kind = typing.get_origin(kinds[0]) or kinds[0]  # tuple[int, ...] -> tuple
                if kind is tuple:
                    item = typing.get_args(kinds[0])[0]
            found[f.name] = FieldType(kind, type(None) in args, item)
        _TYPE_CACHE[cls] = found
    return _TYPE_CACHE[cls]


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_ITEM_WORDS = {int: "integers", float: "numbers", str: "strings"}


def _is_item(value: Any, item: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if item is float else isinstance(value, item)


def _coerce(f: dataclasses.Field, ft: FieldType, value: Any) -> Any:
    if ft.kind is object:  # Any: its owner checks it
        return value
    if value is None:
        check(ft.optional, f"{f.name} must be set, got None")
        return None
    if ft.is_config:
        if isinstance(value, ft.kind):
            return value
        if isinstance(value, dict):
            return build(ft.kind, value)
        raise ConfigError(
            f"{f.name} must be given as {ft.kind.__name__}(...) or a dict of its fields, got {value!r}"
        )
    if isinstance(value, str) and (ft.kind is not str or f.metadata.get("parse") is not None):
        try:
            value = ft.text_parser(f)(value)
        except ConfigError as e:
            raise ConfigError(f"{f.name}: {e}") from None
    if ft.kind is tuple and isinstance(value, list | tuple):
        check(
            all(_is_item(v, ft.item) for v in value),
            f"{f.name} must be {_ITEM_WORDS[ft.item]}, got {value!r}",
        )
        return tuple(float(v) for v in value) if ft.item is float else tuple(value)
    if ft.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ft.kind in _KIND_WORDS and not (
        isinstance(value, ft.kind) and (ft.kind is bool or not isinstance(value, bool))
    ):
        raise ConfigError(f"{f.name} must be {_KIND_WORDS[ft.kind]}, got {value!r}")
    return value


def check_fields(config: Any) -> None:
    """Read text, build nested configs from dicts, refuse wrong types and unknown choices.

    Called first in every config's ``__post_init__``; range checks follow there."""
    types_ = field_types(type(config))
    for f in dataclasses.fields(config):
        value = _coerce(f, types_[f.name], getattr(config, f.name))
        choices = choices_of(f)
        if choices is not None and value is not None:
            what = f.name.replace("_", " ")
            if isinstance(value, tuple):  # the choices are its items': "unknown policy 'x'"
                for item in value:
                    one_of(item_word(f.name), item, choices)
            else:
                one_of(what, value, choices)
        setattr(config, f.name, value)


def default_of(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name``: another option that follows it says so here,
    rather than restating the value (``simulate --block-size`` defaults to the server's)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, with an unknown name refused as a ConfigError that lists the known."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**values)
