"""`python -m cellfm.cli` (what torchrun launches)."""

from cellfm.cli import main

main()
