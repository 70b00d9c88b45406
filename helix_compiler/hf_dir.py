"""A Hugging Face model directory (or its config.json) as a MODEL for `helix plan` / `helix run`.

    helix plan path/to/model_dir --devices 8 --batch 4 --seq 8192    # config only, on meta
    helix run path/to/model_dir --weights path/to/model_dir --devices 4

The model class is the config's first `architectures` entry (the class the checkpoint was
saved from, so its parameter names are the safetensors keys), else `AutoModel`. Only
config.json is read: nothing is downloaded and no weight is loaded here. Three ways to
materialize it:

* "meta": every tensor on the meta device (planning allocates nothing);
* "empty": parameters on meta, buffers real (rotary `inv_freq` is computed from the config;
  no checkpoint holds it): the rank modules then read their slices with `--weights`;
* "random": real, randomly initialized weights (seeded by the caller), for `helix run`
  without `--weights`.

Example inputs: `input_ids` of (batch, seq) and an all-ones `attention_mask`; decoders
get `use_cache=False` (a cache object does not export), encoder-decoders a
`decoder_input_ids` of the same size, vision models `pixel_values` at the config's image size.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import HelixError
from .weights import empty_weights

__all__ = ["INITS", "is_hf_dir", "load_hf_dir"]

INITS = ("meta", "empty", "random")
# Example sizes when --batch / --seq are not given: small enough to capture in seconds, and
# > 1 so that torch.export keeps both dims symbolic (it specializes sizes of 1).
DEFAULT_BATCH = 2
DEFAULT_SEQ = 128


def is_hf_dir(spec: str) -> bool:
    """Whether a MODEL spec names a Hugging Face model directory or a config.json file."""
    p = Path(spec)
    return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.name == "config.json")


def load_hf_dir(spec: str, *, batch: int | None = None, seq: int | None = None,
                init: str = "meta") -> tuple[nn.Module, tuple, dict]:
    """`(model, args, kwargs)` built from the directory's config.json (see the module docstring)."""
    if init not in INITS:
        raise HelixError(f"init must be one of {INITS}, got {init!r}")
    try:
        import transformers
    except ImportError as e:
        raise HelixError(f"model spec {spec!r} is a Hugging Face model directory, but transformers is not "
                         f"installed; pip install transformers") from e
    path = Path(spec)
    config_file = path if path.is_file() else path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
        config = transformers.AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    except Exception as e:
        raise HelixError(f"model spec {spec!r}: {config_file} is not a config transformers can read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a "
                         f"directory written by save_pretrained()") from e
    cls = _model_class(transformers, config, raw, spec)
    batch = DEFAULT_BATCH if batch is None else batch
    seq = DEFAULT_SEQ if seq is None else seq
    for name, value in (("--batch", batch), ("--seq", seq)):
        if not isinstance(value, int) or value < 2:
            raise HelixError(f"{name} {value!r}: example sizes must be integers >= 2 (torch.export fixes "
                             f"sizes of 1, so the program would run only that size)")
    device = "meta" if init == "meta" else "cpu"
    where = {"meta": torch.device("meta"), "empty": empty_weights(),
             "random": contextlib.nullcontext()}[init]
    try:
        with where:
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    except Exception as e:
        raise HelixError(f"model spec {spec!r}: building {cls.__name__} from its config raised "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    model.eval()
    args, kwargs = _example_inputs(model, config, batch, seq, device)
    return model, args, kwargs


def _model_class(transformers, config, raw: dict, spec: str):
    for name in raw.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError as e:
        raise HelixError(f"model spec {spec!r}: transformers has no model class for config "
                         f"{type(config).__name__} (architectures {raw.get('architectures')}); build the "
                         f"model in a MODEL .py file instead") from e


def _example_inputs(model: nn.Module, config, batch: int, seq: int, device: str) -> tuple[tuple, dict]:
    main = getattr(model, "main_input_name", "input_ids")
    kwargs: dict = {}
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        x = torch.randn(batch, channels, size, size, device=device)
        return (x,), kwargs
    vocab = getattr(config, "vocab_size", None) or 2
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq), device=device)
    if getattr(config, "use_cache", False):
        kwargs["use_cache"] = False
    return (ids,), kwargs
