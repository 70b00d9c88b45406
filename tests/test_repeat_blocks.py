"""Repeated blocks (helix_compiler/repeat.py): a list of identical layers is exported as layers
0, 1 and L-1 and the rest copied in the graph.  The copied graph must compute what the full
capture computes, name every weight as model.state_dict() does, and give the same sites and
MLPs; layers that differ (per-layer attention types, attributes, ops between layers) must fall
back to the full capture with a note that says why."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from helix_compiler import helix_compile
from helix_compiler.capture import capture
from helix_compiler.pipeline import analyze
from tests.helpers import assert_ranks_equal, eager_output

LAYERS = 9   # >= repeat.MIN_LAYERS: layers 2..7 are copies of layer 1


def _attention_mask() -> torch.Tensor:
    am = torch.ones(3, 11, dtype=torch.long)
    am[1, :4] = 0       # left-padded by 4
    am[2, :] = 0        # fully padded
    return am


def _llama(device="cpu"):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 128, (3, 11), device=device)
    return model, (ids,), {"attention_mask": _attention_mask().to(device), "use_cache": False}


@pytest.fixture(scope="module")
def llama():
    model, args, kwargs = _llama()
    return model, args, kwargs, analyze(model, args, kwargs, repeat_blocks=False)


def _ops(gm):
    return [(n.op, str(n.target)) for n in gm.graph.nodes if n.op != "get_attr"]


def _attrs(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")


def test_repeated_capture_is_the_full_graph_and_computes_the_same(llama):
    model, args, kwargs, full = llama
    rep = capture(model, args, kwargs)
    info = rep.gm.meta["repeat_blocks"]
    assert info["captured"] == (0, LAYERS - 1) and info["copied"] == (1, LAYERS - 2)
    assert "repeat_blocks" not in full.captured.gm.meta
    # the same ops in the same order, the same weights read
    assert _ops(rep.gm) == _ops(full.captured.gm)
    assert _attrs(rep.gm) == _attrs(full.captured.gm)
    # named as in the user's model, the user's own tensors
    sd = model.state_dict(keep_vars=True)
    assert set(sd) <= set(rep.params) and all(rep.params[k] is sd[k] for k in sd)
    assert sorted(rep.params) == sorted(full.captured.params)
    assert dict(rep.gm.named_parameters()).keys() == dict(full.captured.gm.named_parameters()).keys()
    # the copied graph's code is generated on first use (gm.code, gm(...)), and is its graph's code
    assert type(rep.gm)._needs_recompile()
    assert rep.gm.code == rep.gm.graph.python_code(root_module="self").src
    # other sizes than the example (dynamic), padded rows: equal bit for bit
    ids = torch.randint(0, 128, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[0, :3] = 0
    for a, kw in (((ids,), {"attention_mask": am, "use_cache": False}), (args, kwargs)):
        with torch.no_grad():
            got = rep.gm(*a, **kw)[0]
            want = full.captured.gm(*a, **kw)[0]
        assert torch.equal(got, want)
        assert not torch.isnan(got).any()


@pytest.fixture(scope="module")
def prog22(llama):
    model, args, kwargs, _ = llama
    return helix_compile(model, devices=4, example_inputs=args, example_kwargs=kwargs, plan=(2, 2),
                         variant="score-reduce")


def test_repeated_llama_sharded_2x2_equals_model_on_every_rank(llama, prog22):
    model, args, kwargs, full = llama
    prog = prog22
    assert "repeat_blocks" in prog.analysis.captured.gm.meta
    assert len(prog.analysis.matches) == len(full.matches) == LAYERS
    assert len(prog.analysis.mlps) == len(full.mlps) == LAYERS
    assert [m.site.q_weight for m in prog.analysis.matches] == [m.site.q_weight for m in full.matches]
    assert prog.analysis.summary.param_elements == full.summary.param_elements
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs), devices=4)


@pytest.mark.slow
def test_repeated_meta_compile_loads_each_ranks_weights_by_state_dict_name(tmp_path, llama, prog22):
    model = llama[0]
    meta, margs, mkwargs = _llama("meta")
    path = tmp_path / "model.pt"
    sd = model.state_dict()
    sd["rotary_emb.inv_freq"] = model.rotary_emb.inv_freq   # a non-persistent buffer, on meta in `meta`
    torch.save(sd, path)
    prog = helix_compile(meta, devices=4, example_inputs=margs, example_kwargs=mkwargs, plan=(2, 2),
                         variant="score-reduce")
    assert "repeat_blocks" in prog.analysis.captured.gm.meta
    for r in (0, 3):
        want = prog22.rank_module(r).state_dict()
        got = prog.rank_module(r, weights=path).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_gemma2_sliding_and_global_layers_fall_back_and_equal_the_model():
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                       attn_logit_softcapping=None, final_logit_softcapping=None,  # Helix: no softcap
                       attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2Model(cfg).eval()
    args, kwargs = (torch.randint(0, 128, (3, 11)),), {"attention_mask": _attention_mask(), "use_cache": False}
    prog = helix_compile(model, devices=2, example_inputs=args, example_kwargs=kwargs, plan=(1, 2))
    gm = prog.analysis.captured.gm
    assert "repeat_blocks" not in gm.meta
    note = "repeat_blocks: layers: layer 1.self_attn.layer_type = 'full_attention', layer 2 has " \
           "'sliding_attention'; captured all 8 layers"
    assert note in prog.notes, prog.notes
    assert len(prog.analysis.matches) == 8
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs), devices=2)


class Block(nn.Module):
    def __init__(self, d: int, scale: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * torch.tanh(self.fc(self.norm(x)))


class IndexedBlock(Block):
    """A layer that acts on its own index (allowed to differ per layer, as HF's layer_idx):
    from layer `late` on it adds its input once more."""

    def __init__(self, d: int, layer_idx: int, late: int):
        super().__init__(d, 1.0)
        self.layer_idx, self.late = layer_idx, late

    def forward(self, x):
        y = super().forward(x)
        return y + x if self.layer_idx >= self.late else y


class Stack(nn.Module):
    def __init__(self, scales, boost_at=None, layer_types=None, late=None):
        super().__init__()
        if layer_types is not None:     # as HF configs list per-layer attention kinds
            self.config = SimpleNamespace(layer_types=layer_types, hidden_size=16)
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block(16, s) for s in scales) if late is None else \
            nn.ModuleList(IndexedBlock(16, i, late) for i in range(len(scales)))
        self.boost_at = boost_at

    def forward(self, x):
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.boost_at:
                x = x * 2          # an op of the parent's loop, between two layers
        return x


class GainBlock(Block):
    def forward(self, x, gain):
        return super().forward(x) * gain


class GainStack(Stack):
    """The parent passes layer 4 another argument than the others: a layer the export does
    not run (a stub) must get what the template layer got, else the capture falls back."""

    def __init__(self):
        super().__init__([1.0] * 10)
        self.blocks = nn.ModuleList(GainBlock(16, 1.0) for _ in range(10))

    def forward(self, x):
        x = self.inp(x)
        for i, block in enumerate(self.blocks):
            x = block(x, 0.5 if i == 4 else 1.0)
        return x


@pytest.mark.parametrize("model, reason", [
    (GainStack(), "layer 4 gets other arguments from the parent than layer 9"),
    (Stack([1.0] * 10), None),
    (Stack([1.0] * 5), ""),                                    # too short: captured whole, no note
    (Stack([1.0] * 9 + [0.5]), "layer 9.scale = 0.5, layer 2 has 1.0"),
    (Stack([1.0] * 10, boost_at=6), "interleaved"),
    (Stack([1.0] * 10, boost_at=1), "interleaved"),         # between layer 1 and the stubs
    (Stack([1.0] * 10, late=1), 3),                          # layer 0 alone differs: three layers
    (Stack([1.0] * 10, late=5), "captured layer 9 differs from layer 1 at"),
    (Stack([1.0] * 10, late=2), "captured layer 9 differs from layer 1 at"),
    (Stack([1.0] * 10, layer_types=["full"] * 10), None),
    (Stack([1.0] * 10, layer_types=["full", "sliding"] * 5), "config.layer_types = ['full', 'sliding', "),
])
def test_hand_written_stack_repeats_only_when_layers_are_alike(model, reason):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 5, 8)
    got = capture(model, (x,), {})
    rep = got.gm.meta.get("repeat_blocks")
    if reason is None:      # layers 0 and 9 exported, 9 copied for 1 .. 8
        assert rep == {"list": "blocks", "layers": 10, "captured": (0, 9), "copied": (1, 8)}
        assert got.note == ""
    elif reason == 3:       # layer 0 is not layer 9 with another input: 0, 1 and 9 exported
        assert rep == {"list": "blocks", "layers": 10, "captured": (0, 1, 9), "copied": (2, 8),
                       "two_layers": rep["two_layers"]}
        assert rep["two_layers"].startswith("layer 0 is not layer 9 with another input at")
        assert got.note == ""
    else:
        assert rep is None
        assert (reason in got.note) if reason else got.note == ""
    y = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert torch.equal(got.gm(y), model(y))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_layer=8, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                bos_token_id=0, eos_token_id=0))


def _mistral_sliding():
    from transformers import MistralConfig, MistralModel

    return MistralModel(MistralConfig(num_hidden_layers=8, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      sliding_window=3, attn_implementation="sdpa"))


@pytest.mark.slow
@pytest.mark.parametrize("build, path", [(_gpt2, "h"), (_mistral_sliding, "layers")])
def test_gpt2_and_mistral_sliding_window_repeat_and_equal_the_model(build, path):
    torch.manual_seed(0)
    model = build().eval()
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0
    args, kwargs = (torch.randint(0, 64, (2, 9)),), {"attention_mask": am, "use_cache": False}
    got = capture(model, args, kwargs)
    assert got.gm.meta["repeat_blocks"]["list"] == path and got.note == ""
    with torch.no_grad():
        assert torch.equal(got.gm(*args, **kwargs)[0], model(*args, **kwargs)[0])
