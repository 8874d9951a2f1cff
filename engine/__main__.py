"""``python -m engine`` is the ``fieldsync`` command."""

from engine.cli import main

main()
