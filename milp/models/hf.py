"""The frozen base LLM: any Hugging Face causal LM from a local path or a Hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from milp.errors import MilpError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer (pad token guaranteed)."""

    model: PreTrainedModel
    tokenizer: object
    name: str


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
