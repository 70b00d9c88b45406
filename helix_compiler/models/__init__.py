"""Models that ship with Helix: the paper's benchmark model (`paper`) and the LLaMA-style
GQA benchmark model (`llama_gqa`). `helix plan` plans `paper:paper_meta` when no MODEL is
given; `helix bench` measures both. `decoder_cache` is a static-cache decoder and `hf_static`
wraps a Hugging Face causal LM as one (`compile_decoder`, `helix generate`). The compiler's
passes import none of them; decode.py uses `decoder_cache`'s step wrappers and
cli/generate.py both decoders."""
