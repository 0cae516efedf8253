"""The frozen-prefix cache: hidden states entering the lowest memory layer, kept per example.

Memory sits on layers L.. of a frozen base; the embedding and layers 0..L-1 carry no
trainable weight, so the hidden states entering layer L are a fixed function of an
example's tokens. `PrefixCache` computes them once per history example (no grad, under
whatever autocast the caller runs) and replays them on every later step, where only
layers L.., the final norm and the head run.

Rows are right-padded. Under causal attention a real position never sees the padding
after it, so an example's states do not depend on the batch it came in: they are kept
unpadded, keyed by the example's tokens, and re-padded into each step's batch (padding
positions get zeros; their outputs are masked out of the loss).

Memory: `bytes = tokens x hidden_size x element size` per cached example (float32
states: 4 bytes; a SmolLM2-135M user with 32 replies of ~60 tokens: 32 x 60 x 576 x 4
= 4.4 MB; a 7B model, hidden 4096, 200 items of 300 tokens: 0.98 GB). Entries live on
the device they were computed on. Above `max_bytes` no further example is stored: such
rows are recomputed on every step (the same result, without the saving).

Supported: Hugging Face Llama-family decoders (`embed_tokens`, `rotary_emb`, `layers`,
`norm`; Llama, Mistral, Qwen2, ...) whose layers share one attention type. Anything
else, or a model failing the equivalence probe run at construction, leaves the cache
disabled (`enabled` False, `reason` says why) and callers use the full forward.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from milp.inject.loss import causal_lm

DEFAULT_MAX_BYTES = 1 << 30
_PROBE_TOKENS = 8


def prefix_bytes(tokens: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a cache holding `tokens` positions of states takes."""
    return tokens * hidden_size * torch.empty((), dtype=dtype).element_size()


class PrefixCache:
    """Hidden states entering layer `start_layer` of `model`, per example (see module doc).

    `final_hidden(batch)` gives the final (normed) hidden states of a batch, as the
    decoder's own forward would, from cached prefix states plus layers `start_layer`..
    Entries are grouped by `owner` (a user id or a bank slot) so a finished user's can
    be dropped with `release(owner)`; `clear()` drops all.
    """

    def __init__(
        self, model: nn.Module, start_layer: int, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.model, self.start_layer, self.max_bytes = model, int(start_layer), int(max_bytes)
        self.entries: dict[tuple[Hashable, bytes], torch.Tensor] = {}
        self.owners: dict[Hashable, list[tuple[Hashable, bytes]]] = {}
        self.nbytes = 0
        self.hits = self.misses = self.not_stored = 0
        self.decoder = None
        self.reason = self._unsupported()
        if self.reason is None:
            self.reason = self._probe()

    @property
    def enabled(self) -> bool:
        return self.reason is None

    # ------------------------------------------------------------------ checks

    def _unsupported(self) -> str | None:
        lm = causal_lm(self.model)
        decoder = getattr(lm, "model", None)
        needed = ("embed_tokens", "rotary_emb", "layers", "norm")
        if decoder is None or not all(hasattr(decoder, n) for n in needed):
            return f"{type(lm).__name__} is not a Llama-family decoder ({', '.join(needed)})"
        layers = decoder.layers
        if not isinstance(layers, nn.ModuleList) or not 0 <= self.start_layer < len(layers):
            return f"start layer {self.start_layer} is not a layer of the model"
        types = getattr(lm.config, "layer_types", None)
        if types and len(set(types)) > 1:
            return f"layers mix attention types ({', '.join(sorted(set(types)))})"
        frozen = [decoder.embed_tokens, *layers[: self.start_layer]]
        if any(p.requires_grad for m in frozen for p in m.parameters()):
            return f"parameters below layer {self.start_layer} are trainable"
        if any(
            m.training
            and (
                (isinstance(m, nn.Dropout) and m.p > 0)
                or getattr(lm.config, "attention_dropout", 0.0)
            )
            for f in frozen
            for m in f.modules()
        ):
            return f"dropout is active below layer {self.start_layer}"
        self.decoder = decoder
        return None

    @torch.no_grad()
    def _probe(self) -> str | None:
        """Compare replayed and full forward on a few tokens (eval mode, float32)."""
        decoder = self.decoder
        device = decoder.embed_tokens.weight.device
        vocab = decoder.embed_tokens.weight.shape[0]
        ids = (torch.arange(_PROBE_TOKENS, device=device) % vocab)[None]
        mask = torch.ones_like(ids)
        modes = {m: m.training for m in decoder.modules()}
        decoder.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                full = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                replayed = self._suffix(self._prefix(ids, mask), attention_mask=mask)
        finally:
            for m, mode in modes.items():
                m.training = mode
        full = full.last_hidden_state.float()
        error = (full - replayed.float()).abs().max() / full.abs().max().clamp(min=1e-6)
        if not torch.isfinite(error) or error > 1e-4:
            self.decoder = None
            return f"replaying layers {self.start_layer}.. differs from the full forward"
        return None

    # ------------------------------------------------------------------ forward

    @contextmanager
    def _only(self, layers: nn.ModuleList, norm: nn.Module | None) -> Iterator[None]:
        # The decoder's own forward (masks, rotary embeddings) over a slice of its layers.
        decoder = self.decoder
        original_layers, original_norm = decoder.layers, decoder.norm
        decoder.layers = layers
        if norm is not None:
            decoder.norm = norm
        try:
            yield
        finally:
            decoder.layers, decoder.norm = original_layers, original_norm

    def _prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._only(self.decoder.layers[: self.start_layer], nn.Identity()):
            return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]

    def _suffix(self, states: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        with self._only(self.decoder.layers[self.start_layer :], None):
            return self.decoder(inputs_embeds=states, use_cache=False, **inputs)[0]

    def final_hidden(
        self, batch: dict[str, torch.Tensor], owners: Sequence[Hashable] | None = None
    ) -> torch.Tensor:
        """Final hidden states [rows, T, H] of a batch, as the decoder's forward gives them.

        The batch is right-padded (`input_ids`, `attention_mask` 1...1 0...0) or packed
        (`input_ids`, `position_ids`, `segment_lengths`, from `milp.inject.fast.pack_rows`).
        `owners[row]` files each row's entries (default: one owner for all).
        """
        if not self.enabled:
            raise RuntimeError(f"the prefix cache is disabled: {self.reason}")
        ids = batch["input_ids"]
        rows, width = ids.shape
        segments = _segments(batch)
        ids_cpu = ids.cpu()
        owners = list(owners) if owners is not None else [None] * rows
        keys = [(owners[r], ids_cpu[r, a : a + n].numpy().tobytes()) for r, a, n in segments]
        found = [self.entries.get(key) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(segments) - len(missing)
        self.misses += len(missing)
        if missing:  # their states, computed as right-padded rows of their own
            cut = max(segments[i][2] for i in missing)
            fresh_ids = ids.new_zeros(len(missing), cut)
            fresh_mask = ids.new_zeros(len(missing), cut)
            for j, i in enumerate(missing):
                r, a, n = segments[i]
                fresh_ids[j, :n] = ids[r, a : a + n]
                fresh_mask[j, :n] = 1
            with torch.no_grad():
                fresh = self._prefix(fresh_ids, fresh_mask)
            for j, i in enumerate(missing):
                found[i] = fresh[j, : segments[i][2]]
                self._store(keys[i], found[i])
        states = found[0].new_zeros(rows, width, found[0].shape[-1])
        for (r, a, n), f in zip(segments, found, strict=True):
            states[r, a : a + n] = f
        if "position_ids" in batch:
            return self._suffix(states, position_ids=batch["position_ids"])
        return self._suffix(states, attention_mask=batch["attention_mask"])

    def _store(self, key: tuple[Hashable, bytes], states: torch.Tensor) -> None:
        if key in self.entries:  # the same example twice in one batch
            return
        size = states.numel() * states.element_size()
        if self.nbytes + size > self.max_bytes:
            self.not_stored += 1
            return
        self.entries[key] = states.clone()
        self.owners.setdefault(key[0], []).append(key)
        self.nbytes += size

    def release(self, owner: Hashable = None) -> None:
        """Drop the entries of one owner (a finished user)."""
        for key in self.owners.pop(owner, []):
            entry = self.entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry.numel() * entry.element_size()

    def clear(self) -> None:
        """Drop every entry (and keep the counters)."""
        self.entries.clear()
        self.owners.clear()
        self.nbytes = 0


def _segments(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, length) of every example in a right-padded or packed batch."""
    if "segment_lengths" in batch:
        out = []
        for r, lengths in enumerate(batch["segment_lengths"].tolist()):
            start = 0
            for n in lengths:
                if n:
                    out.append((r, start, n))
                    start += n
        return out
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask.bool(), positions[None] < lengths[:, None]):
        raise ValueError("PrefixCache needs right-padded rows (attention_mask 1...1 0...0)")
    return [(r, 0, n) for r, n in enumerate(lengths.tolist())]
