"""Offline training side of Fable: data preparation, the trainer and experiments."""
