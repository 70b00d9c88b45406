"""The paper's benchmark model as a MODEL file: a 2-layer dense transformer, no embedding.

The model itself ships with the package (helix_compiler/models/paper.py: PaperConfig,
PaperModel, build); this file is what a user's MODEL file looks like.

    python examples/paper_model.py                   # run the scaled model on the CPU
    helix plan examples/paper_model.py               # plan the scaled model (helix_model)
    helix plan examples/paper_model.py:paper_meta    # the full-size model, on meta
"""

from __future__ import annotations

import torch

from helix_compiler.models.paper import (Block, MLP, PaperConfig, PaperModel,  # noqa: F401
                                         SelfAttention, build)


def helix_model() -> tuple[PaperModel, tuple[torch.Tensor]]:
    """MODEL spec for `helix plan examples/paper_model.py`: the scaled model on the CPU."""
    return build(PaperConfig.scaled(), "cpu")


def paper_meta() -> tuple[PaperModel, tuple[torch.Tensor]]:
    """MODEL spec for `helix plan examples/paper_model.py:paper_meta`: full size, on meta."""
    return build(PaperConfig(), "meta")


def main() -> None:
    model, (x,) = helix_model()
    with torch.no_grad():
        y = model(x)
    params = sum(p.numel() for p in model.parameters())
    full = sum(p.numel() for p in paper_meta()[0].parameters())
    print(f"scaled: {model.config}")
    print(f"  {params:,} parameters, input {tuple(x.shape)} -> output {tuple(y.shape)}")
    print(f"paper: {full:,} parameters (D={PaperConfig().hidden}, F={PaperConfig().mlp})")


if __name__ == "__main__":
    main()
