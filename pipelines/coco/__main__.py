"""Entry point of `python -m pipelines.coco` (usage: pipelines/coco/__init__.py)."""
import sys

from pipelines.recipes import main

sys.exit(main("coco"))
