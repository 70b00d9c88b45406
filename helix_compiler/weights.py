"""Read one rank's weight slices from a checkpoint without loading whole tensors.

Two layouts, as users have them:

* a torch state_dict file (`torch.save(model.state_dict(), path)`): opened with
  `torch.load(mmap=True, weights_only=True)`, so a slice reads only its pages;
* a directory of safetensors files as Hugging Face writes them (with or without
  `model.safetensors.index.json`): each slice is read with `safe_open(...).get_slice`,
  one contiguous run of rows or columns at a time.

Slices are (dim, global indices) pairs from the shard pass (`HelixProgram.rank_shards`).

A model meant to be loaded this way is built under `empty_weights()`: its parameters on the
meta device (no memory), its buffers real, since a checkpoint holds no non-persistent buffer
(Hugging Face rotary's `inv_freq`) and a buffer computed on meta has no values.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from .errors import HelixError


@contextlib.contextmanager
def empty_weights():
    """Build a model with its parameters on the meta device and its buffers real (on the default
    device), for `helix_compile` and then `rank_module(r, weights=PATH)`:

        with helix_compiler.empty_weights():
            model = LlamaForCausalLM(config)

    Each parameter is moved to meta as a module registers it, before the module initializes it,
    so no weight is ever filled in memory; buffers (rotary `inv_freq`, which no checkpoint
    holds) are computed as usual. `torch.device("meta")` instead puts buffers on meta too, and
    such a model's program cannot be loaded from a checkpoint. The patch of
    `nn.Module.register_parameter` is process-wide for the duration of the block (not
    thread-safe), as accelerate's `init_empty_weights(include_buffers=False)` does it."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            moved = type(p)(p.to("meta"), requires_grad=p.requires_grad)
            moved.__dict__.update(p.__dict__)
            module._parameters[name] = moved

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _runs(idx: np.ndarray):
    """Contiguous runs [(start, stop), ...] covering idx in order."""
    if len(idx) == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks + 1, [len(idx)]])
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops)]


class _StateDictSource:
    def __init__(self, path: Path):
        try:
            self.sd = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception as e:
            raise HelixError(f"{path}: cannot read as a torch state_dict with weights_only=True "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); save it with "
                             f"torch.save(model.state_dict(), path)") from e
        if not isinstance(self.sd, dict):
            raise HelixError(f"{path}: holds a {type(self.sd).__name__}, not a state_dict")

    def names(self):
        return set(self.sd)

    def read(self, name: str, sels) -> torch.Tensor:
        t = self.sd[name]
        for dim, idx in sels:
            t = torch.cat([t.narrow(dim, a, b - a) for a, b in _runs(idx)], dim=dim)
        return t.clone() if not sels else t.contiguous()


class _SafetensorsSource:
    def __init__(self, path: Path):
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise HelixError("reading safetensors checkpoints needs the safetensors package: "
                             "pip install safetensors") from e
        self._open = safe_open
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise HelixError(f"{path}: no *.safetensors files; pass a state_dict file or a "
                             f"directory as Hugging Face writes it")
        self.where: dict = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            for name, f in json.loads(index.read_text())["weight_map"].items():
                self.where[name] = path / f
        else:
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        self.where[name] = f
        self._handles: dict = {}

    def names(self):
        return set(self.where)

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = self._open(str(f), framework="pt")
        return self._handles[f]

    def read(self, name: str, sels) -> torch.Tensor:
        sl = self._handle(self.where[name]).get_slice(name)
        if not sels:
            return sl[:]
        if len(sels) > 1:  # slice the first dim from the file, the rest in memory
            t = self.read(name, sels[:1])
            for dim, idx in sels[1:]:
                t = torch.cat([t.narrow(dim, a, b - a) for a, b in _runs(idx)], dim=dim)
            return t.contiguous()
        dim, idx = sels[0]
        nd = len(sl.get_shape())
        parts = []
        for a, b in _runs(idx):
            key = tuple(slice(None) if k != dim else slice(a, b) for k in range(nd))
            parts.append(sl[key])
        return torch.cat(parts, dim=dim).contiguous()


def open_checkpoint(path) -> object:
    p = Path(path)
    if p.is_dir():
        return _SafetensorsSource(p)
    if p.is_file():
        if p.suffix == ".safetensors":
            src = _SafetensorsSource.__new__(_SafetensorsSource)
            _SafetensorsSource.__init__(src, p.parent)
            return src
        return _StateDictSource(p)
    raise HelixError(f"weights path {p} does not exist; pass a state_dict file (.pt) or a "
                     f"directory of safetensors files")


def load_rank_weights(shards: dict, current: dict, path, buffers=frozenset()) -> dict:
    """attr name -> tensor for one rank, sliced from the checkpoint at `path`.

    `shards` maps attr -> (source name, selections); `current` holds the compiled tensors
    (used for index constants and for buffers a checkpoint does not store, when real);
    `buffers` names the model's buffers (for the message when one is on meta).
    """
    src = open_checkpoint(path)
    names = src.names()
    out, missing = {}, []
    for attr, tensor in current.items():
        if attr not in shards:
            out[attr] = tensor  # index constants made by the shard pass
            continue
        name, sels, perm = shards[attr]
        if name in names:
            t = src.read(name, sels)
            if perm is not None and list(perm) != list(range(t.dim())):
                t = t.permute(*perm).contiguous()  # a transposed view of the stored weight
            if tuple(t.shape) != tuple(tensor.shape):
                raise HelixError(f"{path}: {name} gives a slice of shape {tuple(t.shape)} where the "
                                 f"program expects {tuple(tensor.shape)}; is the checkpoint for this model?")
            out[attr] = t.to(tensor.dtype)
        elif tensor.device.type != "meta":
            out[attr] = tensor
        else:
            missing.append(name)
    lost = [name for name in missing if name in buffers]
    if lost:
        raise HelixError(f"{path}: buffer {lost[0]!r} is on the meta device and no checkpoint holds it"
                         f"{f' ({len(lost) - 1} more buffers likewise)' if len(lost) > 1 else ''}: "
                         f"build the model under helix_compiler.empty_weights() (parameters on "
                         f"meta, buffers real) instead of torch.device('meta'), and compile again")
    if missing:
        raise HelixError(f"{path}: the checkpoint lacks {len(missing)} tensors the program needs "
                         f"({', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}) and the "
                         f"model held them on meta; save them in the checkpoint or build those "
                         f"buffers on the CPU")
    return out
