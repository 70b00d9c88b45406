"""All ranks of a program in one process: one thread per rank, collectives simulated
(collectives.SimulatedBackend). What `HelixProgram.simulate`, pipeline stages and the tests
run rank modules with."""

from __future__ import annotations

import threading

import torch

from ..errors import HelixError, first_line
from . import collectives
from .mesh import Mesh

__all__ = ["run_ranks"]


def run_ranks(modules: list, mesh: Mesh, args: tuple, kwargs: dict,
              timeout_s: float = 300.0) -> list:
    """Run rank modules concurrently in this process with simulated collectives."""
    sim = collectives.SimulatedBackend(mesh, timeout_s=timeout_s)
    outs, errors = [None] * len(modules), [None] * len(modules)

    def go(r):
        collectives.bind(sim.for_rank(r))
        try:
            with torch.no_grad():
                outs[r] = modules[r](*args, **kwargs)
        except BaseException as e:  # reported below, with the rank
            errors[r] = e
            sim.abort(e)
        finally:
            collectives.bind(None)

    threads = [threading.Thread(target=go, args=(r,), name=f"helix-rank-{r}") for r in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, collectives._Aborted)]
    if first:
        r, e = first[0]
        raise HelixError(f"rank {r} failed in simulation: {first_line(e)}") from e
    if any(e is not None for e in errors):
        r = next(r for r, e in enumerate(errors) if e is not None)
        raise HelixError(f"rank {r} failed in simulation: {errors[r]}") from errors[r]
    return outs
