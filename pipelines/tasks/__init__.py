"""Synthetic tasks and locally built models, so nothing needs a model hub."""
