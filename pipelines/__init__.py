"""Orchestration beyond one stage: the local pipeline run, SLURM submission, paper-scale variants."""
