"""Trainers, the training loop, evaluation, logging, checkpoints and signal handling."""
