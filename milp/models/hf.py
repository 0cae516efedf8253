"""The frozen base LLM: any Hugging Face causal LM from a local path or a Hub id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import CONFIG_NAME, cached_file
from transformers.utils import logging as hf_logging

from milp.errors import MilpError
from milp.run.files import cached_sha256, publish_dir

HASH_CACHE = "file-sha256.json"  # under paths.cache_dir: model files' hashes (model_identity)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer (pad token guaranteed)."""

    model: PreTrainedModel
    tokenizer: object
    name: str


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own bars off while loading or saving weights: a run shows one
    progress bar, over its users."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def publish_model(directory: str | Path, model, tokenizer, marker: str, record: str) -> Path:
    """Save `model` (safetensors) and `tokenizer` as a model directory, published whole
    (`milp.run.files.publish_dir`) with `marker` holding `record`; generation pads and stops
    with the tokenizer's tokens."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with publish_dir(directory, marker) as staging:
        with no_progress_bars():
            model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / marker).write_text(record)
    return Path(directory)


def load_base_model(
    name_or_path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    use_safetensors: bool = True,
) -> BaseModel:
    """Load a causal LM and its tokenizer, frozen, in evaluation mode.

    Weights are read from safetensors only unless `use_safetensors` is turned off, and
    `trust_remote_code` stays off unless the user turns it on: loading a model must
    never run code or unpickle files from the internet by default.
    """
    if dtype not in DTYPES:
        raise MilpError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    is_local = Path(name_or_path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                revision=revision,
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
                use_safetensors=use_safetensors,
            )
    except (OSError, ValueError) as err:
        where = "local path" if is_local else "Hub id (no local directory of that name)"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MilpError(
            f"model.name_or_path={name_or_path!r}: cannot load it as a {where}: {first_line}"
        ) from None
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return BaseModel(model, tokenizer, name_or_path)


def model_files(model: PreTrainedModel) -> Path | None:
    """The directory a loaded model was read from: its local path, or its snapshot in the
    Hugging Face cache; None where neither can be found."""
    source = str(model.name_or_path)
    if Path(source).is_dir():
        return Path(source)
    try:
        config = cached_file(
            source,
            CONFIG_NAME,
            revision=getattr(model.config, "_commit_hash", None),
            local_files_only=True,
        )
    except (OSError, ValueError):
        return None
    return Path(config).parent if config else None


def model_identity(base: BaseModel, cache_dir: str | Path | None = None) -> str:
    """A content hash of the base model: the SHA-256 of every file at the top of its
    directory (config, weights, tokenizer), so retrained or edited weights under the same
    name are a different model. File hashes are remembered under `cache_dir` by (path,
    size, modification time): a large model is read once. A model with no files to read
    is identified by its name, revision and config."""
    directory = model_files(base.model)
    if directory is None:
        described = {
            "name": str(base.model.name_or_path),
            "revision": getattr(base.model.config, "_commit_hash", None),
            "config": base.model.config.to_dict(),
        }
        blob = json.dumps(described, sort_keys=True, default=str)
    else:
        files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        cache = Path(cache_dir) / HASH_CACHE if cache_dir is not None else None
        hashes = cached_sha256(files, cache)
        blob = json.dumps({p.name: hashes[p] for p in files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
