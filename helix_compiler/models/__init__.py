"""Models that ship with Helix: the paper's benchmark model (`paper`) and the LLaMA-style
GQA benchmark model (`llama_gqa`). `helix plan` plans `paper:paper_meta` when no MODEL is
given; `helix bench` measures both. Nothing in the compiler imports them."""
