"""Entry point of `python -m pipelines.imagenet` (usage: pipelines/imagenet/__init__.py)."""
import sys

from pipelines.recipes import main

sys.exit(main("imagenet"))
