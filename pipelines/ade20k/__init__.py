"""`python -m pipelines.ade20k RECIPE [--ade20k PATH] [--target STAGE] [--write FILE] [--dry-run] [-- DVC ARGS]`

Runs the paper-scale UperNet 160k on ADE20K recipe RECIPE (a file of pipelines/ade20k/) as the DVC experiment
`ade20k-RECIPE`, up to evaluate_seg by default, with data.ade20k set to --ade20k (the ADE20K root:
ADEChallengeData2016/).
Fine-tuning starts from the recipe's `init` (this pipeline's pretrain checkpoint, or a released one with
`init.kind: official`). `--write FILE` writes the complete params file instead, for running the stages
without DVC.
"""
