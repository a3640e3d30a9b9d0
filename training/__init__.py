"""Running distillation stages: datasets, the stage loop, checkpoints and DDP.

The math of a stage lives in ``lightning.distill``; this package drives it on real data and hardware.
"""
