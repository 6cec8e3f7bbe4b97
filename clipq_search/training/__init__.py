"""Data sets, model builders and the training loop."""
