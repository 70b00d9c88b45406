"""FX graph passes of the Helix compiler, one job per module.

helix_compiler/pipeline.py runs them in the order of its list `PASSES`:
fold_params -> slice_copies -> find_attention -> size_masks.causal_at_example ->
unpartitioned -> find_mlp -> (workload) -> seeds -> shard (placements, collectives,
localized rank graphs), then on each rank graph kernel_choice -> size_masks.
"""
