"""The ``msattn`` command line: thin Typer commands (:mod:`msattn.cli.app` and the modules beside it)."""
