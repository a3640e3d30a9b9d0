"""A toy world with an exact teacher, where the distillation code of :mod:`lightning.distill` runs on CPU.

``python -m lightning.toy --seed S --out DIR`` runs the demo (see :mod:`lightning.toy.demo`).
"""
