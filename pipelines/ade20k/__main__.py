"""Entry point of `python -m pipelines.ade20k` (usage: pipelines/ade20k/__init__.py)."""
import sys

from pipelines.recipes import main

sys.exit(main("ade20k"))
