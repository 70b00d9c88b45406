"""The measurement harness: `helix bench` and `helix calibrate` (DESIGN.md section 10).

It sits above the library and the library never imports it (tests/test_measure.py
checks): the compiler plans from a profile and a cluster, this package measures them.

    timing.py               one timer: CUDA events with an L2 flush, perf_counter on the CPU
    stub.py                 compute-only collectives (the right shapes, no transfer)
    surgery.py              rank graphs re-batched, checked on meta, given random weights
    profiling.py            FLOPs and the per-op-class time split of one call
    runners.py              what one benchmark row runs: a helix rank graph or a DTensor
                            TP baseline, buildable at any micro-batch; timed with OOM halving
    predict.py              the cost model's prediction for a measured row
    paper.py, gqa.py        the two suites: the paper's model on 16 devices, a LLaMA-style
                            GQA model on 8 and 32
    bench.py                `helix bench [--model paper|gqa]`: measure or re-assemble
    calibrate.py            `helix calibrate`: one GPU's op rates -> profile YAML
    calibrate_collectives.py  `helix calibrate --collectives`: NCCL alpha-beta fit

Every model it measures ships with the package (helix_compiler/models/).
"""

from __future__ import annotations

import logging


def configure_logging() -> None:
    """Progress lines on stderr, as `helix bench` / `helix calibrate` print them (their
    `main` calls it; a program that imports the harness configures logging itself)."""
    logger = logging.getLogger(__name__)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
