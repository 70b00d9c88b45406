"""Models built without their weights (helix_compiler.empty_weights), compiled, and loaded per
rank from a real checkpoint: a Hugging Face model's rotary `inv_freq` is a non-persistent buffer
that no checkpoint holds, so it must be real while the parameters are on meta."""

import pytest
import torch

from helix_compiler import HelixError, empty_weights, helix_compile
from helix_compiler.program import run_ranks
from tests.helpers import assert_ranks_equal, eager_output, save_checkpoint

BATCH, SEQ, VOCAB = 3, 7, 256


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                       attn_implementation="eager")


def _inputs():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        ids = torch.randint(3, VOCAB, (BATCH, SEQ))    # (B, S)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, :2] = 0                                    # left-padded
    mask[2, :] = 0                                     # fully padded
    return (ids,), {"attention_mask": mask, "use_cache": False}


def _real():
    from transformers import LlamaModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaModel(_config()).float().eval()


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers_real():
    from transformers import LlamaModel

    with empty_weights():
        model = LlamaModel(_config())
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    inv = dict(model.named_buffers())["rotary_emb.inv_freq"]
    assert inv.device.type == "cpu"
    assert torch.equal(inv, dict(_real().named_buffers())["rotary_emb.inv_freq"])
    # the patch ends with the block
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_empty_weights_model_loaded_per_rank_equals_real_model(tmp_path, fmt):
    from transformers import LlamaModel

    real = _real()
    args, kwargs = _inputs()
    want = eager_output(real, args, kwargs)
    path = save_checkpoint(real, tmp_path, fmt)
    with empty_weights():
        empty = LlamaModel(_config()).eval()
    prog = None
    for m, n, variant in ((1, 4, None), (2, 2, "score-reduce"), (2, 2, "qk-gather")):
        prog = helix_compile(empty, devices=4, example_inputs=args, example_kwargs=kwargs, plan=(m, n),
                             variant=variant, dynamic=False) if prog is None \
            else prog.recompile(plan=(m, n), variant=variant)
        assert all(t.device.type == "meta" for k, t in prog.rank_module(0).state_dict().items()
                   if "inv_freq" not in k and not k.startswith("_helix_index"))
        mods = [prog.rank_module(r, weights=path) for r in range(4)]
        for mod in mods:
            assert {t.device.type for t in mod.state_dict().values()} == {"cpu"}
        assert_ranks_equal(run_ranks(mods, prog.mesh, args, kwargs), want, devices=4,
                           label=f"{fmt} m={m} x n={n} {variant or 'heads'}")


def test_fully_meta_model_is_refused_naming_empty_weights(tmp_path):
    from transformers import LlamaModel

    path = save_checkpoint(_real(), tmp_path, "state_dict")
    with torch.device("meta"):
        meta = LlamaModel(_config()).eval()
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    prog = helix_compile(meta, devices=4, example_inputs=(ids,), example_kwargs={"use_cache": False},
                         plan=(2, 2), dynamic=False)
    with pytest.raises(HelixError, match=r"buffer 'rotary_emb\.inv_freq' is on the meta device and no "
                                         r"checkpoint holds it: build the model under "
                                         r"helix_compiler\.empty_weights\(\)"):
        prog.rank_module(0, weights=path)
