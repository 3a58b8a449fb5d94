"""`python -m clawstore` runs the command line."""

from clawstore.cli import main

main()
