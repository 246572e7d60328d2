"""``python -m moe.train`` is ``moe-train`` (torchrun and the launchers start it so)."""

from moe.cli.train import main

main()
