"""`python -m pipelines.coco RECIPE [--coco PATH] [--target STAGE] [--write FILE] [--dry-run] [-- DVC ARGS]`

Runs the paper-scale Mask R-CNN 1x on COCO 2017 recipe RECIPE (a file of pipelines/coco/) as the DVC experiment
`coco-RECIPE`, up to evaluate_det by default, with data.coco set to --coco (the COCO root: train2017/, val2017/,
annotations/).
Fine-tuning starts from the recipe's `init` (this pipeline's pretrain checkpoint, or a released one with
`init.kind: official`). `--write FILE` writes the complete params file instead, for running the stages
without DVC.
"""
