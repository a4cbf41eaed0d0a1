"""Subcommands of the ``k2`` command line, one module each (see ``k2.cli``)."""
