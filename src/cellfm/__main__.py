"""`python -m cellfm`: the command line, as `cellfm`."""

from cellfm.cli import main

main()
