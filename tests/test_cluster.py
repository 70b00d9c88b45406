"""Cluster presets and the YAML loader's errors."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from helix_compiler.planning.cluster import PRESETS, load_cluster, normalize_dtype
from helix_compiler.errors import HelixError

REPO = Path(__file__).resolve().parents[1]


def preset_text(name: str) -> str:
    return (resources.files("helix_compiler.planning") / "clusters" / f"{name}.yaml").read_text()


def test_paper_preset_is_two_nodes_of_eight_h100_on_ndr():
    c = load_cluster("paper")
    assert (c.name, c.nodes, c.gpus_per_node, c.devices) == ("paper", 2, 8, 16)
    assert c.peak_flops("float16") == c.peak_flops("bf16") == 989e12
    assert c.peak_flops("torch.float32") == 67e12
    assert c.memory_bandwidth == 3.35e12 and c.memory_bytes == 80 * 10 ** 9
    assert c.nvlink_busbw == 370e9 and c.nic_bandwidth == 47e9 and c.nics_per_node == 8
    assert c.nvlink_alpha == 15e-6 and c.network_alpha == 40e-6
    assert [c.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]


def test_h100x8_preset_is_one_node():
    c = load_cluster("h100x8")
    assert (c.nodes, c.gpus_per_node, c.devices) == (1, 8, 8)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_figure_cites_its_source_in_a_comment(name):
    figures = [line for line in preset_text(name).splitlines()
               if re.match(r"^\s*\w+:\s*[\d.]+", line)]
    assert len(figures) >= 10
    for line in figures:
        if line.split(":")[0].strip() in ("nodes", "gpus_per_node"):
            continue
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, line
    assert load_cluster(name).name == name


def test_preset_yaml_files_are_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["helix_compiler.planning"]
    assert "clusters/*.yaml" in patterns
    shipped = {p.name for p in (resources.files("helix_compiler.planning") / "clusters").iterdir()}
    assert {f"{name}.yaml" for name in PRESETS} <= shipped


def test_a_cluster_file_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(preset_text("paper").replace("name: paper", "name: mine")
                    .replace("nodes: 2", "nodes: 4"))
    c = load_cluster(path)
    assert (c.name, c.devices) == ("mine", 32)
    assert load_cluster(str(path)) == c


def test_unknown_name_lists_presets():
    with pytest.raises(HelixError, match=r"no cluster preset or file named 'dgx9'; presets: "
                                         r"paper, paper-h200, h100x8, or give the path of a YAML file"):
        load_cluster("dgx9")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, preset_text("paper").replace("nodes: 2", "nodes: [2"))
    with pytest.raises(HelixError, match=r"cluster file '.*c.yaml': line \d+, column \d+ is not "
                                         r"valid YAML"):
        load_cluster(path)


def test_unknown_key_is_named_with_the_known_ones(tmp_path):
    path = write(tmp_path, preset_text("paper").replace("nic_gb_s:", "nic_gbps:"))
    with pytest.raises(HelixError, match=r"c.yaml': unknown key 'nic_gbps'; known keys: name, "):
        load_cluster(path)


def test_missing_key_points_at_the_example(tmp_path):
    text = "\n".join(line for line in preset_text("paper").splitlines()
                     if not line.startswith("network_alpha_us"))
    with pytest.raises(HelixError, match=r"c.yaml': missing key 'network_alpha_us'; see "
                                         r"helix_compiler/planning/clusters/paper.yaml"):
        load_cluster(write(tmp_path, text))


@pytest.mark.parametrize("old, new, message", [
    ("nodes: 2", "nodes: two", "nodes must be an integer, got 'two'"),
    ("nodes: 2", "nodes: 2.5", "nodes must be an integer, got 2.5"),
    ("nodes: 2", "nodes: 0", "nodes must be a positive integer, got 0"),
    ("hbm_tb_s: 3.35", "hbm_tb_s: 3.35e12", "PyYAML reads 1e12 as text"),
    ("nic_gb_s: 47", "nic_gb_s: true", "nic_gb_s must be a number, got True"),
    ("  fp32: 67", "  tf32: 67", "matmul_peak_tflops must map each of fp16, bf16, fp32"),
    ("nvlink_alpha_us: 15", "nvlink_alpha_us: -1", "nvlink_alpha must be a positive number"),
])
def test_wrongly_typed_values_are_refused_naming_file_and_key(tmp_path, old, new, message):
    text = preset_text("paper")
    assert old in text
    with pytest.raises(HelixError, match=r"c.yaml'.*" + re.escape(message)):
        load_cluster(write(tmp_path, text.replace(old, new, 1)))


def test_a_non_mapping_file_is_refused(tmp_path):
    with pytest.raises(HelixError, match="expected a mapping of key: value lines, got list"):
        load_cluster(write(tmp_path, "- 1\n- 2\n"))


def test_cluster_spec_is_frozen_hashable_and_validated():
    c = load_cluster("paper")
    assert hash(c) == hash(load_cluster("paper"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.nodes = 3
    with pytest.raises(HelixError, match="gpus_per_node must be a positive integer, got 0"):
        dataclasses.replace(c, gpus_per_node=0)


def test_unknown_dtype_says_which_are_known():
    assert normalize_dtype("bfloat16") == "bf16"
    with pytest.raises(HelixError, match="unknown dtype 'int8'; the cost model knows fp16, bf16"):
        normalize_dtype("int8")
