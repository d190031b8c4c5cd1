"""Synthetic-shapes demo: a dataset and a trainer whose checkpoints the daemon serves offline."""
