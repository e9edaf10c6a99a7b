"""``python -m itemgen.cli`` (e.g. ``accelerate launch -m itemgen.cli train ...``) = the ``itemgen`` command."""

from itemgen.cli import main

main()
