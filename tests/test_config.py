"""Options: one definition per option (its default and help with its field), the command line
generated from it, the same values and messages from Python and from the command line, and
one registry of policies that every list of policies reads."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bucketserve.argparse_options import engine_configs, option_name, server_config
from bucketserve.cli import build_parser, main
from bucketserve.config import (
    OFFLINE_SCHEDULER_DEFAULTS,
    BucketConfig,
    EngineConfig,
    OrderConfig,
    SchedulerConfig,
    ServerConfig,
    StaticConfig,
    with_options,
)
from bucketserve.core.policies import all_policies, get_policy, make_scheduler, policy_names
from bucketserve.core.scheduler import Scheduler
from bucketserve.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "bucketserve"


def subcommand(name: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def options_of(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(option name, field) for every option-bearing field of ``cls``, nested configs included."""
    found = []
    for f in dataclasses.fields(cls):
        if f.name == "policy_config":
            continue  # every policy's own options are listed under its name
        if dataclasses.is_dataclass(f.default_factory):
            found += options_of(f.default_factory, option_name(f, prefix))
        else:
            found.append((option_name(f, prefix), f))
    return found


def engine_options() -> list[tuple[str, dataclasses.Field]]:
    found = options_of(EngineConfig) + options_of(SchedulerConfig)
    for policy in all_policies():
        found += options_of(policy.config, policy.name)
    return found


def default_of(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# -- the command line is generated from the configs ------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve", "profile"])
def test_every_config_field_is_an_option_with_its_default_and_help(command: str) -> None:
    parser = subcommand(command)
    actions = {s: a for a in parser._actions for s in a.option_strings}
    expected = engine_options() + (options_of(ServerConfig) if command == "serve" else [])
    for name, f in expected:
        action = actions.get(f"--{name}")
        assert action is not None, f"{command} has no --{name} for {f.name}"
        want = default_of(f)
        if command == "generate" and f in dataclasses.fields(SchedulerConfig):  # offline, as LLM
            want = OFFLINE_SCHEDULER_DEFAULTS.get(f.name, want)
        assert action.default == want, f"--{name}: {action.default!r} != {want!r}"
        text = parser._get_formatter()._expand_help(action)
        assert text.startswith(f.metadata["help"].split("%")[0]) and "default" in text, text


@pytest.mark.parametrize("command", ["generate", "serve", "profile"])
def test_help_explains_every_option_with_its_default(command: str) -> None:
    parser = subcommand(command)
    in_required_group = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if action.dest == "help" or action in in_required_group or action.default is False:
            continue  # --help, --prompt | --file, and store_true switches that are off unless given
        assert "default" in (action.help or ""), f"{command} {action.option_strings}: {action.help!r}"


def test_the_documented_flags_still_parse() -> None:
    # Every engine and server flag README.md and docs/ use, in their historical spellings.
    argv = """serve --model m --dtype float32 --device cpu --kv-cache-memory 1GiB --kv-cache-fraction 0.3
        --block-size 8 --max-model-len 2048 --cache-dir c --num-threads 2 --engine-seed 3
        --quantization int8 --enforce-eager --policy bucket --max-num-seqs 16
        --max-num-batched-tokens 512 --no-chunked-prefill --order edf --aging 2 --default-ttft-slo 5
        --bucket-n-max 4 --bucket-theta 0.6 --bucket-window 0.1 --bucket-boundaries 128,64
        --bucket-split-mode optimal --bucket-reserve predicted --static-batch-size 4 --uellm-a 2
        --uellm-b 1 --uellm-batch-cap 5 --uellm-threshold 100 --distserve-saturation 256
        --host 0.0.0.0 --port 9000 --served-model-name x --max-waiting-requests 8 --api-key k
        --shutdown-grace 3"""
    args = build_parser().parse_args(shlex.split(argv))
    engine, sched = engine_configs(args)
    assert engine == EngineConfig(
        model="m",
        dtype="float32",
        device="cpu",
        kv_cache_memory=2**30,
        kv_cache_fraction=0.3,
        block_size=8,
        max_model_len=2048,
        cache_dir="c",
        num_threads=2,
        seed=3,
        quantization="int8",
        enforce_eager=True,
    )
    bucket = BucketConfig(
        n_max=4,
        theta=0.6,
        dispatch_window_s=0.1,
        initial_boundaries=(64, 128),
        split_mode="optimal",
        reserve="predicted",
    )
    assert sched == SchedulerConfig(
        policy="bucket",
        max_num_seqs=16,
        max_num_batched_tokens=512,
        enable_chunked_prefill=False,
        order=OrderConfig(order="edf", aging_s=2.0, default_ttft_slo_s=5.0),
        policy_config=bucket,
    )
    assert server_config(args) == ServerConfig("0.0.0.0", 9000, "x", 8, "k", 3.0)


def test_no_options_give_the_default_configs() -> None:
    args = build_parser().parse_args(["serve"])
    assert engine_configs(args) == (EngineConfig(), SchedulerConfig())
    # generate is offline: the configs LLM() builds
    args = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert engine_configs(args) == (EngineConfig(), SchedulerConfig(**OFFLINE_SCHEDULER_DEFAULTS))


def test_the_chosen_policy_gets_its_own_options_and_the_others_are_ignored() -> None:
    args = build_parser().parse_args(
        ["serve", "--policy", "static", "--static-batch-size", "4", "--bucket-theta", "0.9"]
    )
    assert engine_configs(args)[1].policy_config == StaticConfig(batch_size=4)


# -- Python takes the same values, read and checked the same way -----------------------------


def test_python_and_the_command_line_build_the_same_configs() -> None:
    argv = "--kv-cache-memory 1GiB --policy static --static-batch-size 4 --order sjf --block-size 8"
    from_cli = engine_configs(build_parser().parse_args(["generate", "--prompt", "hi", *argv.split()]))
    options = {
        "kv_cache_memory": "1GiB",
        "policy": "static",
        "policy_config": {"batch_size": 4},
        "order": {"order": "sjf"},
        "block_size": "8",
    }
    from_python = with_options(None, None, options, OFFLINE_SCHEDULER_DEFAULTS)  # as LLM builds them
    assert from_cli == from_python
    assert from_python[0].kv_cache_memory == 2**30 and from_python[0].block_size == 8


def test_llm_accepts_a_size_as_text(make_llm) -> None:
    llm = make_llm(kv_cache_memory="1MiB")
    assert llm.engine.config.kv_cache_memory == 2**20


def test_llm_takes_the_configs_and_keywords_override_them(make_llm) -> None:
    llm = make_llm(scheduler_config=SchedulerConfig(policy="static"), max_num_seqs=4)
    assert llm.engine.scheduler_config == SchedulerConfig(policy="static", max_num_seqs=4)


def test_generate_starts_from_the_offline_limits_and_serve_from_the_servers() -> None:
    def limits(*argv: str) -> tuple[int, int]:
        _, sched = engine_configs(build_parser().parse_args(list(argv)))
        return sched.max_num_seqs, sched.max_num_batched_tokens

    assert limits("generate", "--prompt", "hi") == (256, 4096)
    assert limits("generate", "--prompt", "hi", "--max-num-seqs", "8") == (8, 4096)
    assert limits("serve") == (256, 1024)
    assert "(default: 256)" in " ".join(subcommand("generate").format_help().split())


def test_help_shows_every_default_even_where_the_text_says_default_in_prose() -> None:
    """--deadline-token-share's help speaks of "the tightest class or default" target and
    --order's of no default; both still show theirs, and an empty list or None reads "none"."""
    text = " ".join(subcommand("serve").format_help().split())
    assert "by 3.6 s) (default: 0.0006)" in text
    assert "--deadline-token-share) (default: edfs)" in text
    assert "come first (default: none)" in text
    assert "(default: None)" not in text  # --prefill-replicas: no disaggregation unless given


def test_llm_starts_from_the_offline_limits_unless_told_otherwise() -> None:
    _, offline = with_options(None, None, {}, OFFLINE_SCHEDULER_DEFAULTS)
    assert (offline.max_num_seqs, offline.max_num_batched_tokens) == (256, 4096)
    assert SchedulerConfig().max_num_batched_tokens == 1024  # the server's steps stay smaller
    _, told = with_options(None, None, {"max_num_seqs": 8}, OFFLINE_SCHEDULER_DEFAULTS)
    assert (told.max_num_seqs, told.max_num_batched_tokens) == (8, 4096)
    _, given = with_options(None, SchedulerConfig(max_num_seqs=16), {}, OFFLINE_SCHEDULER_DEFAULTS)
    server_tokens = SchedulerConfig().max_num_batched_tokens
    assert (given.max_num_seqs, given.max_num_batched_tokens) == (16, server_tokens)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kv_cache_memory": "lots"}, "kv_cache_memory: cannot read 'lots' as a size"),
        ({"kv_cache_memory": -5}, "kv_cache_memory must be > 0 bytes"),
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
        ({"block_size": 2.5}, "block_size must be an integer, got 2.5"),
        ({"block_size": None}, "block_size must be set, got None"),
        ({"max_num_seqs": "many"}, "max_num_seqs: cannot read 'many' as an integer"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'; choose one of auto, bfloat16, float32, float16"),
        ({"enforce_eager": "maybe"}, "enforce_eager: cannot read 'maybe' as true or false"),
        (
            {"policy": "fifo"},
            "unknown policy 'fifo'; choose one of bucket, continuous, static, uellm, distserve",
        ),
        ({"order": {"order": "random"}}, "unknown order 'random'; choose one of fcfs, sjf, ljf, edf, edfs"),
        ({"order": {"deadline_token_share": -1}}, "deadline_token_share must be >= 0, got -1"),
        ({"order": "edf"}, "order must be given as OrderConfig(...) or a dict of its fields"),
        ({"policy": "static", "policy_config": {"batch_size": 0}}, "static batch_size must be >= 1, got 0"),
        ({"policy": "static", "policy_config": {"theta": 0.5}}, "unknown StaticConfig option(s) theta"),
        ({"policy": "static", "policy_config": BucketConfig()}, "policy 'static' takes a StaticConfig"),
        ({"kv_cache_mem": "1GiB"}, "unknown option 'kv_cache_mem'; did you mean kv_cache_memory?"),
    ],
)
def test_a_bad_value_is_refused_with_one_line_that_names_it(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        with_options(None, None, options)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: cannot read 'lots' as a size"),
        (["--policy", "fifo"], "argument --policy: invalid choice: 'fifo'"),
        (["--block-size", "x"], "argument --block-size: cannot read 'x' as an integer"),
        (["--policy", "static", "--static-batch-size", "0"], "static batch_size must be >= 1, got 0"),
        (["--kv-cache-fraction", "2"], "kv_cache_fraction must be in (0, 0.95], got 2.0"),
    ],
)
def test_the_command_line_refuses_a_bad_value_with_one_line_and_status_2(
    argv: list[str], message: str, capsys
) -> None:
    try:
        code = main(["generate", "--prompt", "hi", *argv])  # refused before any model is loaded
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err


# -- the policy registry ---------------------------------------------------------------------


def test_the_registry_lists_all_five_policies_each_with_its_scheduler_and_options() -> None:
    assert policy_names() == ("bucket", "continuous", "static", "uellm", "distserve")
    for policy in all_policies():
        assert issubclass(policy.scheduler, Scheduler) and dataclasses.is_dataclass(policy.config)
        assert get_policy(policy.name) is policy and policy.summary
        config = SchedulerConfig(policy=policy.name)
        assert isinstance(config.policy_config, policy.config)  # its own options, defaults
        assert type(make_scheduler(config, _blocks(), 64)) is policy.scheduler


def _blocks():
    from bucketserve.core.block_manager import BlockManager

    return BlockManager(16, 4)


def test_an_unknown_policy_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown policy 'fifo'; choose one of bucket, continuous, static"):
        get_policy("fifo")
    with pytest.raises(ConfigError, match="unknown policy 'fifo'"):
        SchedulerConfig(policy="fifo")


def test_every_list_of_policies_reads_the_registry() -> None:
    policy = next(a for a in subcommand("generate")._actions if a.dest == "policy")
    assert tuple(policy.choices) == policy_names()
    simulate = subcommand("simulate").parse_args([])
    assert simulate.policies == policy_names()
    compare = subcommand("bench")._subparsers._group_actions[0].choices["compare"]  # type: ignore[union-attr]
    assert ",".join(policy_names()) in next(a.help for a in compare._actions if a.dest == "policies")
    # No module spells the five names out again.
    spelled = '"bucket", "continuous", "static", "uellm", "distserve"'
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert spelled not in text and "bucket,continuous,static,uellm,distserve" not in text, path


# -- no import cycle -------------------------------------------------------------------------


def _imports(path: Path, module: str) -> set[str]:
    """The bucketserve modules ``path`` imports, at any depth, except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # submodules named in a from-import
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m.startswith("bucketserve")}


def test_the_modules_import_one_another_without_a_cycle() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules (to register them) is not a cycle.
    state: dict[str, int] = {}

    def walk(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if dep.startswith(name + "."):
                continue
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


ALONE = "options config argparse_options core.scheduler core.policies.bucket core.policies.registry"
ALONE += " sim.profile cli entrypoints.llm"


@pytest.mark.parametrize("module", [f"bucketserve.{m}" for m in ALONE.split()])
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 2, "threads_per_replica": 0}, "threads_per_replica must be >= 1"),
        ({"prefill_replicas": 1}, "go together"),
        ({"replicas": 2, "prefill_replicas": 1, "decode_replicas": 1}, "not both"),
        ({"ray_address": "auto"}, "--address needs"),
    ],
)
def test_replica_options_that_cannot_work_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**options)
