"""The paper model scaled down with one sequence (a batch of 1): a MODEL spec for tests, where
a sequence-parallel all-gather along the sequence runs in place (every dim before it is 1)."""

import dataclasses

import torch


def helix_model():
    from examples.paper_model import PaperConfig, build

    torch.manual_seed(0)
    model, args = build(dataclasses.replace(PaperConfig.scaled(), batch=1))
    return model.float().eval(), args
