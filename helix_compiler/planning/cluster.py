"""Cluster specs: what the cost model knows about the machines.

A `ClusterSpec` holds SI units (FLOP/s, bytes/s, bytes, seconds). Its YAML
form uses the units datasheets and nccl-tests print (TFLOP/s, TB/s, GB/s, us),
one figure a line, each with a comment naming its source. Presets live in
`helix_compiler/planning/clusters/*.yaml`; `load_cluster` takes a preset name or a path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ..errors import HelixError

PRESETS = ("paper", "paper-h200", "h100x8")

# dtype spellings (torch, numpy, short) -> the key of the peak tables
_DTYPES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}
DTYPES = ("fp16", "bf16", "fp32")


def normalize_dtype(dtype: str) -> str:
    """'float16' / 'torch.float16' / 'half' -> 'fp16' (and bf16, fp32)."""
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise HelixError(
            f"unknown dtype {dtype!r}; the cost model knows {', '.join(DTYPES)} "
            f"(also spelled float16, bfloat16, float32)") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    """Nodes of identical GPUs: NVLink inside a node, NIC rails between nodes."""

    name: str
    nodes: int
    gpus_per_node: int
    gpu: str
    peak_flops_fp16: float    # dense matmul FLOP/s
    peak_flops_bf16: float
    peak_flops_fp32: float
    memory_bandwidth: float   # HBM bytes/s
    memory_bytes: int         # device memory
    nvlink_busbw: float       # ring collective bus bandwidth inside a node, bytes/s
    nvlink_alpha: float       # latency of one collective inside a node, s
    nic_bandwidth: float      # achievable bytes/s of one NIC
    nics_per_node: int
    network_alpha: float      # latency of one collective across nodes, s

    def __post_init__(self) -> None:
        for key in ("name", "gpu"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise HelixError(f"ClusterSpec.{key} must be a non-empty string, got {value!r}")
        for key in ("nodes", "gpus_per_node", "nics_per_node", "memory_bytes"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise HelixError(
                    f"ClusterSpec {self.name!r}: {key} must be a positive integer, got {value!r}")
        for key in ("peak_flops_fp16", "peak_flops_bf16", "peak_flops_fp32", "memory_bandwidth",
                    "nvlink_busbw", "nvlink_alpha", "nic_bandwidth", "network_alpha"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise HelixError(
                    f"ClusterSpec {self.name!r}: {key} must be a positive number, got {value!r}")

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak_flops(self, dtype: str) -> float:
        """Dense matmul peak FLOP/s for `dtype` ('fp16', 'float16', ...)."""
        return getattr(self, f"peak_flops_{normalize_dtype(dtype)}")

    def node_of(self, rank: int) -> int:
        """Ranks fill nodes in order: rank r sits on node r // gpus_per_node."""
        return rank // self.gpus_per_node


# YAML key -> (field, decimal exponent to SI, type); counts are int, figures int or float
_YAML_FIELDS = {
    "name": ("name", 0, str),
    "nodes": ("nodes", 0, int),
    "gpus_per_node": ("gpus_per_node", 0, int),
    "gpu": ("gpu", 0, str),
    "matmul_peak_tflops": (None, 12, dict),
    "hbm_tb_s": ("memory_bandwidth", 12, float),
    "memory_gb": ("memory_bytes", 9, float),
    "nvlink_busbw_gb_s": ("nvlink_busbw", 9, float),
    "nvlink_alpha_us": ("nvlink_alpha", -6, float),
    "nic_gb_s": ("nic_bandwidth", 9, float),
    "nics_per_node": ("nics_per_node", 0, int),
    "network_alpha_us": ("network_alpha", -6, float),
}
_EXAMPLE = "see helix_compiler/planning/clusters/paper.yaml for a complete, commented example"


def load_cluster(name_or_path: str | Path) -> ClusterSpec:
    """A preset name (`PRESETS`) or the path of a cluster YAML file."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        text = (resources.files(__package__) / "clusters" / f"{name_or_path}.yaml").read_text()
        return cluster_from_yaml(text, source=f"preset {name_or_path!r}")
    path = Path(name_or_path)
    if not path.is_file():
        raise HelixError(
            f"no cluster preset or file named {str(name_or_path)!r}; presets: "
            f"{', '.join(PRESETS)}, or give the path of a YAML file ({_EXAMPLE})")
    return cluster_from_yaml(path.read_text(), source=f"cluster file {str(path)!r}")


def cluster_from_yaml(text: str, *, source: str = "cluster YAML") -> ClusterSpec:
    """Parse and check the YAML form; every error names `source`."""
    data = safe_load_mapping(text, source)
    unknown = sorted(set(data) - set(_YAML_FIELDS))
    if unknown:
        raise HelixError(
            f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(_YAML_FIELDS)}")
    missing = [key for key in _YAML_FIELDS if key not in data]
    if missing:
        raise HelixError(f"{source}: missing key {missing[0]!r}; {_EXAMPLE}")
    fields: dict = {}
    for key, (field_name, exponent, kind) in _YAML_FIELDS.items():
        value = data[key]
        if kind is dict:
            fields.update(_peaks(value, source))
        elif kind is str:
            if not isinstance(value, str):
                raise HelixError(f"{source}: {key} must be a string, got {value!r}")
            fields[field_name] = value
        elif kind is int:
            if not _is_int(value):
                raise HelixError(f"{source}: {key} must be an integer, got {value!r}")
            fields[field_name] = value
        else:
            number = _si(_number(value, key, source), exponent)
            fields[field_name] = round(number) if field_name == "memory_bytes" else number
    try:
        return ClusterSpec(**fields)
    except HelixError as e:
        raise HelixError(f"{source}: {e}") from e


def _peaks(value: object, source: str) -> dict:
    if not isinstance(value, dict) or set(value) != set(DTYPES):
        raise HelixError(
            f"{source}: matmul_peak_tflops must map each of {', '.join(DTYPES)} to TFLOP/s, "
            f"got {value!r}")
    return {f"peak_flops_{k}": _si(_number(value[k], f"matmul_peak_tflops.{k}", source), 12)
            for k in DTYPES}


def _si(number: float, exponent: int) -> float:
    # dividing keeps 15 us == 1.5e-05 s exactly (15 * 1e-6 does not)
    return number * 10.0 ** exponent if exponent >= 0 else number / 10.0 ** -exponent


def safe_load_mapping(text: str, source: str) -> dict:
    """yaml.safe_load `text`, which must hold a mapping; errors name `source` and the line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (getattr(e, "problem", None) or str(e)).splitlines()[0]
        if isinstance(e, yaml.constructor.ConstructorError):
            raise HelixError(
                f"{source}:{where} uses a YAML tag that constructs objects ({problem}); only plain "
                f"numbers, strings, lists and mappings are read: remove the tag") from e
        raise HelixError(
            f"{source}:{where} is not valid YAML ({problem}); check the indentation "
            f"and the ':' after each key") from e
    if not isinstance(data, dict):
        raise HelixError(
            f"{source}: expected a mapping of key: value lines, got {type(data).__name__}")
    return data


def _number(value: object, key: str, source: str) -> float:
    if isinstance(value, str):
        raise HelixError(
            f"{source}: {key} must be a number, got the string {value!r} (PyYAML reads "
            f"1e12 as text: write 1.0e+12, or use the unit in the key name)")
    if not _is_number(value):
        raise HelixError(f"{source}: {key} must be a number, got {value!r}")
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
