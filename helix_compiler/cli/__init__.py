"""The command line, on top of the library: `helix` (main), one torchrun rank of `helix run`
(worker) and of `helix generate` (generate), and the plan tables it prints (report).

Nothing below imports this package (tests/test_imports.py checks the layering). Kept empty
so that a torchrun rank (`python -m helix_compiler.cli.worker`) loads only what it uses.
"""
