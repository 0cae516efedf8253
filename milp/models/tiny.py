"""Build the embedded default base model: a small Llama pretrained on the generic corpus.

No weights can be downloaded here, and memory injection needs a *pretrained* model to
personalize, so milp trains its own: a byte-level BPE tokenizer and a few-layer
Llama-architecture causal LM, fitted on the generic (non-user) part of the embedded
data set in a few CPU minutes, then saved in Hugging Face format (safetensors) under
the cache directory and reused. Run it ahead of time with `python -m milp.models.tiny`;
`model=tiny` builds it on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from milp.data.datamodule import IGNORE_INDEX, PromptFormat, pad_right
from milp.data.synthetic import GENERATOR_VERSION, ensure_synthetic_lamp, load_generic_corpus
from milp.models.hf import BaseModel, load_base_model, publish_model


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines the tiny model; its hash names the cache entry."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 8
    num_heads: int = 4
    data_seed: int = 0
    pretrain_pairs: int = 4000
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def cache_name(self) -> str:
        """Directory name: changes whenever the spec or the data generator changes."""
        blob = json.dumps(asdict(self) | {"generator": GENERATOR_VERSION}, sort_keys=True)
        return f"tiny-llama-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (never out-of-vocabulary) with pad and end tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, window_batches: int = 16
) -> list[list[int]]:
    """The pretraining's batches, shuffled and of similar length: a seeded permutation,
    cut into windows of `window_batches` batches, each window sorted by length and cut
    into batches, then the batches shuffled. Same generator state, same batches; every
    index once."""
    if batch_size < 1 or window_batches < 1:
        raise ValueError("batch_size and window_batches must be >= 1")
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def build_tiny_model(directory: str | Path, spec: TinyModelSpec, cache_dir: str | Path) -> Path:
    """Pretrain the tiny model and save it to `directory` (atomically)."""
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    data_dir = ensure_synthetic_lamp(Path(cache_dir) / "data", spec.data_seed)
    corpus = load_generic_corpus(data_dir)[: spec.pretrain_pairs]
    tokenizer = train_tokenizer([p.prompt + " " + p.target for p in corpus], spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)

    # The loss falls on the answers, as in instruction tuning: within a few CPU minutes
    # this teaches the model to copy an article's facts into a neutral headline, which
    # full-sequence language modelling of the articles learns far more slowly.
    prompt_format = PromptFormat()
    examples = [prompt_format.encode_pair(tokenizer, p) for p in corpus]
    steps = spec.epochs * math.ceil(len(examples) / spec.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))),
    )
    generator = torch.Generator().manual_seed(spec.seed)
    # Batches of similar length: a few long prompts would otherwise pad every batch to
    # their length and double the cost.
    lengths = [len(ids) for ids, _ in examples]
    model.train()
    step, loss_value = 0, float("nan")
    for epoch in range(spec.epochs):
        for indices in length_bucketed_batches(lengths, spec.batch_size, generator):
            batch = [examples[i] for i in indices]
            input_ids = pad_right([ids for ids, _ in batch], tokenizer.pad_token_id)
            attention_mask = pad_right([[1] * len(ids) for ids, _ in batch], 0)
            labels = pad_right([labels for _, labels in batch], IGNORE_INDEX)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step, loss_value = step + 1, loss.item()
            if step % 50 == 0 or step == steps:
                epochs = f"{epoch + 1}/{spec.epochs}"
                print(
                    f"pretrain epoch {epochs} step {step}/{steps} loss {loss_value:.3f}", flush=True
                )

    model.eval()
    summary = {
        "spec": asdict(spec),
        "final_loss": loss_value,
        "steps": step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    publish_model(directory, model, tokenizer, "pretrain.json", json.dumps(summary, indent=2))
    print(f"pretrained tiny model in {summary['seconds']} s -> {directory}", flush=True)
    return Path(directory)


def ensure_tiny_model(cache_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """The cached tiny model's directory, building it first if it is missing."""
    spec = spec or TinyModelSpec()
    directory = Path(cache_dir) / "models" / spec.cache_name()
    if not (directory / "pretrain.json").is_file():
        build_tiny_model(directory, spec, cache_dir)
    return directory


def load_tiny_model(cache_dir: str, dtype: str = "float32", **spec: object) -> BaseModel:
    """`model=tiny`: load the embedded default base model, building it if needed."""
    spec_values = (
        OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
    )
    directory = ensure_tiny_model(cache_dir, TinyModelSpec(**spec_values))
    return load_base_model(str(directory), dtype=dtype)


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """`python -m milp.models.tiny`: build (or find) the tiny base model and print its path."""
    if cfg.model._target_ != "milp.models.tiny.load_tiny_model":
        raise SystemExit("milp.models.tiny builds the embedded tiny model; use model=tiny")
    spec = {k: v for k, v in cfg.model.items() if k not in {"_target_", "cache_dir", "dtype"}}
    print(ensure_tiny_model(cfg.model.cache_dir, TinyModelSpec(**spec)))


if __name__ == "__main__":
    main()
