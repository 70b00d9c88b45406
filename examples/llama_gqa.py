"""A small Hugging Face LLaMA with grouped-query attention, as a MODEL spec for `helix`.

    helix plan examples/llama_gqa.py --devices 4
    helix run examples/llama_gqa.py --devices 4 --backend gloo        # or nccl on 4 GPUs

8 query heads share 2 key/value heads (d = 32), rotary embeddings, RMSNorm, SwiGLU; the
causal mask transformers builds under torch.export runs as is_causal (passes/size_masks.py).
"""

from __future__ import annotations

import torch


def helix_model():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, intermediate_size=512, num_hidden_layers=2,
                         vocab_size=512, max_position_embeddings=256)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 128))
    return model, (ids,), {"use_cache": False}
