"""One thin CLI module per DVC stage (`python -m stages.<name>`); the logic lives in `vig`."""
