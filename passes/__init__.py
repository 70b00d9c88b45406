"""FX graph passes of the Helix compiler, one job per module.

The pipeline (helix_compiler.pipeline) runs them in this order:
find_attention -> find_mlp -> shard (placements, collectives, localized rank graphs).
"""
