"""What a rank needs at run time, and nothing above it (DESIGN.md section 10).

    collectives      torch.ops.helix.all_reduce / all_gather / reduce_scatter and their backends
                     (SimulatedBackend: all ranks in one process; DistributedBackend: torch.distributed)
    kernels          helix.attend (the score-reduce tail) and the fused-kernel head-dim settings
    kernels_chunked  helix.chunked_attention / chunked_attend (exact, blocks of query rows)
    triton_chunk     the s > 1 chunk core's split-KV Triton kernel, (out, lse) (CUDA; triton optional)
    masks            helix.size_mask (a causal mask built from sizes, checked once per size)
    serialize        rank graphs to and from JSON
    graphs           build_module, on_device
    weights          per-rank checkpoint slices, empty_weights()
    mesh             the (n, m) device mesh

Imports only torch, numpy, helix_compiler.errors (and triton where installed): passes and the
library import it, never the other way round (tests/test_imports.py checks each module imports
on its own).
"""
