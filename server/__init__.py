"""Coordinator: Flower ServerApp, head-only aggregation, checkpoints, reports, provisioning."""
