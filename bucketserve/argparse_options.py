"""Command-line options generated from the config dataclasses, and the configs built back.

Each field declared with ``bucketserve.options.option`` becomes one option: ``--`` + its name
(the field's, or the ``name`` it declares) with dashes, after its group's prefix (a policy's
options carry the policy's name: ``--bucket-theta``, ``--static-batch-size``). The help is
the field's, with its default appended; text is read by the field's own parser, so the
command line and ``LLM(...)`` accept the same forms ("1GiB") and report the same errors; a
boolean is a ``--x/--no-x`` pair; a field without a default is a required option. Building
the config back runs its ``__post_init__``, the one place where values are checked.

The same functions build the ``bench`` and ``simulate`` parsers from their configs (the
client, workload, arrival and sweep options; the simulated setup): a subcommand may leave
some fields out (``exclude``) or give one another default (``defaults``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from bucketserve.config import EngineConfig, SchedulerConfig, ServerConfig
from bucketserve.core.policies import all_policies, get_policy
from bucketserve.errors import ConfigError
from bucketserve.options import choices_of, field_types, item_word, one_of, parse_bytes

C = TypeVar("C")
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def option_name(f: dataclasses.Field, prefix: str = "") -> str:
    """The option's name without ``--``: the group's prefix, then the field's own name."""
    own = f.metadata.get("name")
    own = (f.name if own is None else own).replace("_", "-")
    return "-".join(part for part in (prefix, own) if part)


def _dest(f: dataclasses.Field, prefix: str) -> str:
    return option_name(f, prefix).replace("-", "_")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _help(f: dataclasses.Field, prefix: str, default: Any) -> str:
    text = f.metadata["help"]
    if default is not dataclasses.MISSING and "(default" not in text:
        # (a help that writes its own "(default: ...)" keeps its words)
        if isinstance(default, bool):
            shown = f"--{'' if default else 'no-'}{option_name(f, prefix)}"
        elif isinstance(default, tuple):
            shown = ",".join(map(str, default)) or "none"
        elif f.metadata.get("parse") is parse_bytes and isinstance(default, int):
            shown = _bytes_text(default)
        else:
            shown = "none" if default is None else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def _bytes_text(n: int) -> str:
    """A byte count as it would be written: 2GiB, 40GB, else the number."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("GB", 10**9), ("MB", 10**6)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def argparse_type(
    parse: Callable[[str], Any], item_choices: tuple[str, ...] | None = None, what: str = "choice"
) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type=``: its ConfigError shown by argparse as "argument --x:
    <message>" (argparse would print only "invalid parse_bytes value"); ``item_choices``
    checks each item of a parsed list, which argparse's ``choices=`` cannot."""

    def read(text: str) -> Any:
        try:
            value = parse(text)
            for item in value if item_choices is not None else ():
                one_of(what, item, item_choices)  # type: ignore[arg-type]
            return value
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = getattr(parse, "__name__", "value")
    return read


def add_config_options(
    parser: Parser,
    cls: type,
    prefix: str = "",
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one option per field of the dataclass ``cls`` (nested configs recursively), except
    the fields named in ``exclude``; ``defaults`` replaces some fields' defaults (by name)."""
    types = field_types(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        ft = types[f.name]
        if ft.kind is object or "help" not in f.metadata or f.name in exclude:
            continue  # not declared as an option (SchedulerConfig.policy_config: see below)
        if ft.is_config:
            # A nested config's options are prefixed with its field's option name
            # (SchedulerConfig.order declares name="": --order, --aging).
            add_config_options(parser, ft.kind, option_name(f, prefix))
            continue
        flag = "--" + option_name(f, prefix)
        default = defaults.get(f.name, _default(f))
        common: dict[str, Any] = dict(dest=_dest(f, prefix), help=_help(f, prefix, default))
        if default is dataclasses.MISSING:
            common["required"] = True
        else:
            common["default"] = default
        if ft.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            continue
        metavar = f.metadata.get("metavar")
        choices = choices_of(f)
        if ft.kind is tuple:  # a list's choices are its items': checked as it is read
            read, choices = argparse_type(ft.text_parser(f), choices, item_word(f.name)), None
            metavar = metavar or f"{option_name(f).upper().replace('-', '_')}[,...]"
        else:
            read = argparse_type(ft.text_parser(f))
        parser.add_argument(
            flag,
            type=read,
            choices=choices,
            metavar=metavar if metavar or choices else option_name(f).upper().replace("-", "_"),
            **common,
        )


def config_from_options(
    cls: type[C], args: argparse.Namespace, prefix: str = "", exclude: Collection[str] = (), **given: Any
) -> C:
    """Build ``cls`` back from the options :func:`add_config_options` added (``given``
    fields are taken as they are, ``exclude``d ones keep their defaults); its
    ``__post_init__`` checks the values."""
    types = field_types(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        ft = types[f.name]
        if f.name in given or f.name in exclude or ft.kind is object or "help" not in f.metadata:
            continue
        if ft.is_config:
            values[f.name] = config_from_options(ft.kind, args, option_name(f, prefix))
        else:
            values[f.name] = getattr(args, _dest(f, prefix))
    return cls(**values, **given)


# -- the engine's and the server's options ---------------------------------------------------


def add_engine_options(
    parser: argparse.ArgumentParser, scheduler_defaults: Mapping[str, Any] | None = None
) -> None:
    """The model, engine and scheduler options, and every registered policy's own options,
    each policy's named after it (--bucket-theta, --static-batch-size, ...);
    ``scheduler_defaults`` replaces some scheduler defaults (``generate``: the offline ones)."""
    add_config_options(parser.add_argument_group("model and engine"), EngineConfig)
    add_config_options(parser.add_argument_group("scheduler"), SchedulerConfig, defaults=scheduler_defaults)
    for policy in all_policies():
        if dataclasses.fields(policy.config):
            group = parser.add_argument_group(f"{policy.name} policy (with --policy {policy.name})")
            add_config_options(group, policy.config, policy.name)


def engine_configs(args: argparse.Namespace) -> tuple[EngineConfig, SchedulerConfig]:
    """The engine and scheduler configs from :func:`add_engine_options`'s options; the chosen
    policy's options become its ``policy_config`` (other policies' are ignored, so one set of
    server arguments can serve every policy, as ``bench compare --server-args`` does)."""
    policy = get_policy(args.policy)
    policy_config = config_from_options(policy.config, args, policy.name)
    return (
        config_from_options(EngineConfig, args),
        config_from_options(SchedulerConfig, args, policy_config=policy_config),
    )


def add_server_options(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser.add_argument_group("server"), ServerConfig)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return config_from_options(ServerConfig, args)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the process
        raise ConfigError(message)


def serve_configs(args: Collection[str]) -> tuple[EngineConfig, SchedulerConfig]:
    """The engine and scheduler configs a `bucketserve serve ARGS` runs with (server options
    accepted and dropped); a ConfigError for arguments serve would refuse."""
    parser = _RaisingParser(prog="bucketserve serve", add_help=False)
    add_engine_options(parser)
    add_server_options(parser)
    return engine_configs(parser.parse_args(list(args)))
