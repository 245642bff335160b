"""``python -m cellssl`` = the ``cellssl`` command."""

from cellssl.cli import main

main()
