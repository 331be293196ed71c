"""``python -m msattn.cli`` (and ``torchrun -m msattn.cli``): the ``msattn`` command."""

from msattn.cli.app import main

main()
