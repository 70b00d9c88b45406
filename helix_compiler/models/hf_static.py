"""A Hugging Face causal LM as a static-cache decoder (the CacheDecoder interface of
models/decoder_cache.py), so that compile_decoder and `helix generate` take it.

    model = hf_static_decoder(LlamaConfig(...), batch=4, max_seq=16)      # seeded random weights
    model = HFStaticCacheDecoder(LlamaForCausalLM.from_pretrained(...), batch=4, max_seq=16)
    prog = compile_decoder(model, 4, (2, 1, 2))

The cache is transformers' StaticCache, built and initialized as its executorch export wrapper
(`TorchExportableModuleWithStaticCache`) does, its per-layer `keys` / `values` tensors
(B, H_kv, S_max, d) registered as this module's buffers `key_cache_i` / `value_cache_i`: the
model writes them in place at the positions being written (index_copy_), and those are the
buffers the shard pass slices. The wrapper itself is not used: it requires the model's
generation_config to be set to a static cache, and the user's model is not written. Each call
sets every layer's `cumulative_length` (the position the cache writes at) to a fresh tensor of
the call's first position, so a call depends only on its arguments and the cache buffers.

`valid` (B, S_max) is the attention mask over all cache positions (0: a left-padding
position), as `generate` extends its mask with 1 for every new token. Positions (rotary) are
Hugging Face generate's on a left-padded batch (transformers 5.24, GenerationMixin.
_prepare_position_ids_for_generation, then _update_model_kwargs_for_generation):

    position_ids = (valid.cumsum(-1) - 1).masked_fill(valid == 0, 0)      # (B, S_max)

read at the positions being written: row b's real tokens are 0, 1, ... from its first real
token, and a decode step at cache position p is that row's previous position + 1. (Rotary
scores depend on position differences only, so cache positions would give the same logits up
to rounding; HF's positions give HF's rounding, and greedy ties break as HF's do.) The one
difference: a row with no real prompt token (fully padded) has HF positions 1, 2, ... in
its decode steps and 0, 1, ... here; HF's generate is ill-defined there anyway (its prefill
attends over nothing), so such a row is compared with this model's own greedy reference only.

transformers is optional: it is imported when an adapter is built, not when this module is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import HelixError

__all__ = ["HFStaticConfig", "HFStaticCacheDecoder", "hf_static_decoder", "hf_generate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HFStaticConfig:
    """What helix generate reads of a decoder: the cache's rows and positions, the vocabulary."""

    batch: int                # B: rows of the cache
    max_seq: int              # S_max: cache positions (P + T for a generation)
    vocab: int

    def __post_init__(self) -> None:
        for name in ("batch", "max_seq", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HelixError(f"HFStaticConfig.{name}={value!r}: must be a positive integer")


def generate_positions(valid: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids on a left-padded batch, (B, S_max): each row's real
    positions counted from 0, padding 0."""
    return (valid.cumsum(-1) - 1).masked_fill(valid == 0, 0)


def step_positions(valid: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """generate_positions(valid) read at the one cache position p (shape (1,)), (B, 1), as one
    masked sum over the row (the real positions up to p, less 1; 0 where p is padding) rather
    than a scan of every row."""
    upto = torch.arange(valid.shape[1], device=valid.device) <= cache_position     # (S_max,)
    seen = (valid * upto).sum(-1, keepdim=True) - 1                                 # (B, 1)
    return seen.masked_fill(valid.index_select(1, cache_position) == 0, 0)


class HFStaticCacheDecoder(nn.Module):
    """`prefill(tokens, valid)` and `decode_step(token, cache_position, valid)` of a Hugging Face
    causal LM over a StaticCache of `batch` rows and `max_seq` positions (module docstring).
    `hf_causal_lm` is shared, not copied: replicas (`replica`) read the same weights."""

    def __init__(self, hf_causal_lm: nn.Module, batch: int, max_seq: int) -> None:
        super().__init__()
        transformers = _transformers("HFStaticCacheDecoder")
        StaticCache, StaticLayer = transformers.cache_utils.StaticCache, transformers.cache_utils.StaticLayer
        config = getattr(hf_causal_lm, "config", None)
        if config is None or not hasattr(config, "get_text_config"):
            raise HelixError(f"HFStaticCacheDecoder: {type(hf_causal_lm).__name__} is not a Hugging "
                             f"Face model (no PretrainedConfig .config); pass e.g. a LlamaForCausalLM")
        text = config.get_text_config()
        self.cfg = HFStaticConfig(batch=batch, max_seq=max_seq, vocab=text.vocab_size)
        self.model = hf_causal_lm
        self.static_cache = StaticCache(max_cache_len=max_seq, config=text)
        kinds = {type(layer).__name__ for layer in self.static_cache.layers
                 if type(layer) is not StaticLayer}
        if kinds:
            raise HelixError(f"HFStaticCacheDecoder: {type(hf_causal_lm).__name__}'s static cache has "
                             f"{', '.join(sorted(kinds))} layers (sliding window or shared KV); only "
                             f"full-attention StaticLayer caches are supported")
        heads, head_dim = transformers.integrations.executorch.get_head_shapes(text)
        param = next(hf_causal_lm.parameters())
        self.static_cache.early_initialization(batch, heads, head_dim, param.dtype, param.device)
        # the forward's cache argument is `cache` in recent transformers (5.24), `past_key_values`
        # in earlier 5.x (5.17); a name the forward does not take would land in **kwargs unused
        # and the model would build a dynamic cache of its own
        takes = inspect.signature(hf_causal_lm.forward).parameters
        self._cache_arg = "cache" if "cache" in takes else "past_key_values"
        for i, layer in enumerate(self.static_cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)

    def _run(self, tokens, written, valid, positions):
        """Logits (B, T, vocab) for `tokens` (B, T) written at cache positions `written` (T,)
        with rotary positions `positions` (B, T)."""
        for layer in self.static_cache.layers:
            layer.cumulative_length = written[0].clone()      # where StaticLayer.update writes
        return self.model(input_ids=tokens, attention_mask=valid, position_ids=positions,
                          use_cache=True, **{self._cache_arg: self.static_cache}).logits

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Write positions 0 .. T-1 of the cache; logits (B, T, vocab)."""
        written = torch.arange(tokens.shape[1], device=tokens.device)
        return self._run(tokens, written, valid, generate_positions(valid).index_select(1, written))

    def decode_step(self, token: torch.Tensor, cache_position: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at cache position cache_position (1,); logits (B, 1, vocab).

        The position is the prefill's formula read at p = cache_position: the count of real
        positions up to p, less 1 (0 where p itself is padding). Counted as one masked sum, not
        the prefill's cumsum over every row: on an H200 that int64 scan of a (8, 131072) mask took
        243 us of every step (results/decode_compiled_h200_owner2.json's kernel profile)."""
        return self._run(token, cache_position, valid, step_positions(valid, cache_position))

    def reset_cache(self) -> None:
        for layer in self.static_cache.layers:
            layer.keys.zero_()
            layer.values.zero_()

    def replica(self, batch: int) -> "HFStaticCacheDecoder":
        """The same HF model (weights shared) over a new, zeroed cache of `batch` rows
        (decode.replica_model: one data-parallel replica)."""
        return HFStaticCacheDecoder(self.model, batch, self.cfg.max_seq)


def hf_static_decoder(config, batch: int, max_seq: int, seed: int = 0) -> HFStaticCacheDecoder:
    """The causal LM of Hugging Face config `config` (AutoModelForCausalLM) with weights seeded
    by `seed` (the caller's RNG untouched), float32 and eval, wrapped over a StaticCache."""
    auto = _transformers("hf_static_decoder").AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = auto.from_config(config)
        except ValueError as e:
            raise HelixError(f"hf_static_decoder: {type(config).__name__} has no causal LM in "
                             f"transformers ({str(e).splitlines()[0]}); pass a decoder's config, "
                             f"e.g. LlamaConfig") from e
    return HFStaticCacheDecoder(model.float().eval(), batch, max_seq)


@torch.no_grad()
def hf_generate(model: HFStaticCacheDecoder, prompt: torch.Tensor, valid_prompt: torch.Tensor,
                new_tokens: int, cache_implementation: str | None = None) -> torch.Tensor:
    """The reference: Hugging Face's own greedy `generate` of the wrapped model on `prompt`
    (B, P) left-padded as `valid_prompt` (B, P) marks; the new tokens (B, new_tokens). Its
    cache is generate's own (`cache_implementation`: None for its default, or "static"), not
    the adapter's; no end-of-sequence token stops a row early. A row with no real token makes
    generate ill-defined (module docstring)."""
    out = model.model.generate(prompt, attention_mask=valid_prompt, do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=0, eos_token_id=None,
                               cache_implementation=cache_implementation)
    return out[:, prompt.shape[1]:]


def _transformers(what: str):
    """transformers, imported on first use: an optional dependency of the library (the one
    import inside a function)."""
    try:
        import transformers
        import transformers.cache_utils
        import transformers.integrations.executorch
    except ImportError as e:
        raise HelixError(f"{what} needs transformers (a Hugging Face model); pip install "
                         f"transformers") from e
    return transformers
