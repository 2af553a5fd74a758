"""``python -m computegroups``: the command-line tool."""

from computegroups.cli import main

main()
