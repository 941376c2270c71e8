"""PASTA: network, task heads, checkpoints, transforms, pretraining, prediction."""
