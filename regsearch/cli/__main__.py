"""`python -m regsearch.cli`: the same command line as `regsearch`."""

from regsearch.cli import main

main()
