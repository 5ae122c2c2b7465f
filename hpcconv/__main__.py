"""`python -m hpcconv`."""

from hpcconv.cli import main

main()
