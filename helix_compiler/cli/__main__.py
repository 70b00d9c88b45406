"""`python -m helix_compiler.cli ...`: the `helix` command."""

from .main import main

main()
