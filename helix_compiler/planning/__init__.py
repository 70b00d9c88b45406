"""Planning: values and math, no graph rewriting.

The model's attention and MLP sites (sites), the feasible splits (solver), the cost model
(cost), the cluster and compute profile it prices with (cluster + clusters/*.yaml,
profile + profiles/*.yaml), the chosen plan (plan), the decode planner (decode_plan) and the
split spellings messages share (text). Imports only helix_compiler.errors and
helix_compiler.runtime below it; passes/ import its values, never the other way round
(tests/test_imports.py checks the layering).
"""
