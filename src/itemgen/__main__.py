"""``python -m itemgen`` = the ``itemgen`` command (for environments where it is not installed)."""

from itemgen.cli import main

main()
