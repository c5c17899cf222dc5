"""The `bench` and `simulate` command lines are generated from their configs: every field is
an option with its default and help, the documented commands parse to the configs they
describe, and a bad value is refused in one line with exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from typing import Any

import pytest

from bucketserve.argparse_options import config_from_options, option_name
from bucketserve.bench.client import DEFAULT_URL, ClientConfig
from bucketserve.bench.compare import CompareConfig
from bucketserve.bench.report import ReportConfig
from bucketserve.bench.sweep import SweepConfig
from bucketserve.bench.workload import ArrivalConfig, WorkloadConfig
from bucketserve.cli import build_parser, main
from bucketserve.config import EngineConfig, SchedulerConfig
from bucketserve.core.policies import policy_names
from bucketserve.errors import ConfigError
from bucketserve.sim.experiments import ExperimentConfig, Setup, SimulateConfig
from bucketserve.sim.validate import ValidateConfig


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def command(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        parser = subparsers(parser)[name]
    return parser


# Each command, and the configs whose fields are its options (less the fields it leaves out).
COMMANDS: dict[tuple[str, ...], list[tuple[type, tuple[str, ...]]]] = {
    ("bench", "run"): [
        (ClientConfig, ()),
        (WorkloadConfig, ()),
        (ArrivalConfig, ()),
        (ReportConfig, ()),
    ],
    ("bench", "sweep"): [
        (ClientConfig, ()),
        (WorkloadConfig, ()),
        (ArrivalConfig, ("request_rate", "time_scale")),
        (SweepConfig, ()),
        (ReportConfig, ("output_json",)),
    ],
    ("bench", "compare"): [
        (ClientConfig, ("base_url",)),
        (WorkloadConfig, ()),
        (ArrivalConfig, ("request_rate", "time_scale")),
        (SweepConfig, ()),
        (ReportConfig, ("output_json",)),
        (CompareConfig, ()),
    ],
    ("simulate",): [(SimulateConfig, ()), (Setup, ()), (ExperimentConfig, ()), (ValidateConfig, ())],
}
# Set apart from the fields: a field that is no option (Setup.max_model_len's default depends
# on the mode), and the options that are no field.
NOT_OPTIONS = {"extra_body", "kv_bytes_per_token", "weight_bytes", "overrides", "max_model_len"}
OWN_OPTIONS = {"--goodput", "--url", "--server", "--experiment", "--validate", "--max-model-len", "--help"}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("names", list(COMMANDS), ids=" ".join)
def test_every_config_field_is_an_option_with_its_default_and_help(names: tuple[str, ...]) -> None:
    parser = command(*names)
    by_flag = {flag: a for a in parser._actions for flag in a.option_strings}
    covered: set[str] = set()
    for cls, excluded in COMMANDS[names]:
        for f in dataclasses.fields(cls):
            if f.name in NOT_OPTIONS or f.name in excluded:
                assert f"--{option_name(f)}" not in by_flag or f.name == "max_model_len", f.name
                continue
            flag = f"--{option_name(f)}"
            action = by_flag[flag]
            covered.update(action.option_strings)
            assert f.metadata["help"] in action.help, flag
            if names == ("bench", "compare") and f.name == "request_rates":
                assert action.default == (math.inf,)  # compare's own default: all at once
            elif _default(f) is dataclasses.MISSING:
                assert action.required, flag
            else:
                assert action.default == _default(f), flag
    assert set(by_flag) - covered <= OWN_OPTIONS | {"-h"}, "options that belong to no config"


@pytest.mark.parametrize("names", list(COMMANDS), ids=" ".join)
def test_help_shows_each_default_once(names: tuple[str, ...]) -> None:
    for action in command(*names)._actions:
        if action.dest == "help":
            continue
        text = action.help or ""
        expected = 0 if action.required else 1
        assert text.count("default") == expected, f"{action.option_strings}: {text!r}"


def test_simulate_validate_defaults_to_the_servers_own_settings() -> None:
    a = command("simulate").parse_args(["--validate", "x.json"])
    server = config_from_options(ValidateConfig, a)
    assert server.block_size == EngineConfig().block_size
    assert server.scheduler == {
        "max_num_seqs": SchedulerConfig().max_num_seqs,
        "max_num_batched_tokens": SchedulerConfig().max_num_batched_tokens,
    }


# -- the commands in README.md and docs/ ----------------------------------------------------


def parse(line: str) -> argparse.Namespace:
    return build_parser().parse_args(shlex.split(line))


def test_readme_bench_run_parses_to_its_configs() -> None:
    a = parse(
        "bench run --base-url http://127.0.0.1:8000 --num-prompts 100 --max-output-len 128 "
        "--request-rate 2 --goodput ttft:2000 tpot:200 --output-json run.json --no-ignore-eos --no-progress"
    )
    assert config_from_options(ClientConfig, a) == ClientConfig(DEFAULT_URL, ignore_eos=False)
    assert config_from_options(WorkloadConfig, a) == WorkloadConfig(num_prompts=100, max_output_len=128)
    assert config_from_options(ArrivalConfig, a) == ArrivalConfig(request_rate=2.0)
    assert config_from_options(ReportConfig, a) == ReportConfig(progress=False, output_json="run.json")
    assert a.goodput == ["ttft:2000", "tpot:200"]


def test_readme_bench_sweep_and_compare_parse_to_their_configs() -> None:
    a = parse(
        "bench sweep --request-rates 0.5,1,2,4 --num-prompts 60 --max-output-len 128 --goodput ttft:2000"
    )
    assert config_from_options(SweepConfig, a) == SweepConfig((0.5, 1.0, 2.0, 4.0))
    a = parse(
        "bench compare --policies bucket,continuous,static "
        "--server-args='--kv-cache-memory 1GiB --max-model-len 2048' --num-prompts 60 --max-output-len 128"
    )
    assert config_from_options(CompareConfig, a) == CompareConfig(
        ("bucket", "continuous", "static"), "--kv-cache-memory 1GiB --max-model-len 2048"
    )
    assert config_from_options(SweepConfig, a).request_rates == (math.inf,)
    a = parse("bench compare --url ours=http://127.0.0.1:8000 --url vllm=http://127.0.0.1:8001")
    assert a.url == ["ours=http://127.0.0.1:8000", "vllm=http://127.0.0.1:8001"]
    assert config_from_options(CompareConfig, a).policies is None  # --url only: start no server
    a = parse(
        "bench compare --dataset azure-conv --num-prompts 40 --max-prompt-len 1024 --max-output-len 64 "
        "--max-total-len 2048 --request-rates 0.5,1,1.5 --output-dir results/bench --name compare-azure-conv"
    )
    assert config_from_options(WorkloadConfig, a) == WorkloadConfig(
        "azure-conv", 40, max_prompt_len=1024, max_output_len=64, max_total_len=2048
    )
    assert config_from_options(SweepConfig, a) == SweepConfig(
        (0.5, 1.0, 1.5), output_dir="results/bench", name="compare-azure-conv"
    )


def test_readme_and_docs_simulate_commands_parse_to_their_configs() -> None:
    a = parse("simulate --workload mixed --num-requests 1000 --rate 4")
    assert config_from_options(SimulateConfig, a) == SimulateConfig(workload="mixed", rate=4.0)
    assert config_from_options(SimulateConfig, a).policies == policy_names()
    a = parse("simulate --experiment paper --slo-scale 4 --output-dir results/sim/paper-slo4 --pad-prefill")
    assert a.experiment == "paper"
    assert config_from_options(Setup, a) == Setup(slo_scale=4.0, pad_prefill=True)
    assert config_from_options(ExperimentConfig, a).output_dir == "results/sim/paper-slo4"
    a = parse(
        "simulate --profile results/sim/profile-cpu.json --kv-cache-memory 1GiB --max-model-len 2048 "
        "--gpu-memory 80GB --validate results/bench/compare-sharegpt-admitted.json"
    )
    assert a.validate == ["results/bench/compare-sharegpt-admitted.json"] and a.max_model_len == 2048
    assert config_from_options(ValidateConfig, a).kv_cache_memory == 2**30
    setup = config_from_options(Setup, a)
    assert setup.profile == "results/sim/profile-cpu.json" and setup.gpu_memory == 80 * 10**9


def test_the_configs_accept_from_python_what_the_command_line_accepts() -> None:
    assert Setup(gpu_memory="40GB", link_bandwidth="300GB") == Setup()
    assert SweepConfig("0.5,inf").request_rates == (0.5, math.inf)
    assert SimulateConfig(policies="bucket,static").policies == ("bucket", "static")
    with pytest.raises(ConfigError, match="unknown policy 'fifo'"):
        SimulateConfig(policies=("bucket", "fifo"))
    with pytest.raises(ConfigError, match="request_timeout must be > 0"):
        ClientConfig(request_timeout=0)


# -- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("bench run --num-prompts x", "argument --num-prompts: cannot read 'x' as an integer"),
        ("bench run --request-rate 0", "request_rate must be > 0 (or inf), got 0.0"),
        ("bench run --burstiness -1", "burstiness must be > 0, got -1.0"),
        ("bench run --dataset nope", "argument --dataset: invalid choice: 'nope'"),
        ("bench run --goodput e2el:100", "argument --goodput: bad SLO 'e2el:100'"),
        ("bench sweep --request-rates 1,x", "argument --request-rates: expected numbers separated by commas"),
        ("bench sweep --request-rates 0,1", "request_rates must be numbers > 0 (or inf), got 0,1"),
        ("bench compare --policies bucket,fifo", "argument --policies: unknown policy 'fifo'; choose one of"),
        ("bench compare --url fast=localhost:1", "argument --url: bad --url 'fast=localhost:1'"),
        ("bench compare --policies=", "nothing to compare: give --policies, --server and/or --url"),
        ("simulate --gpu-memory lots", "argument --gpu-memory: cannot read 'lots' as a size"),
        ("simulate --policies bucket,fifo", "argument --policies: unknown policy 'fifo'"),
        ("simulate --num-gpus 0", "num_gpus must be >= 1, got 0"),
        ("simulate --validate x.json --kv-cache-memory 0", "argument --kv-cache-memory: size must be > 0"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_with_status_2(argv: str, message: str, capsys) -> None:
    try:  # (each is refused before any request is sent or any simulation runs)
        code = main(shlex.split(argv))
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not err[-1].startswith("Traceback")
