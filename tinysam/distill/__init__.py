"""Distillation: losses, hard prompt sampling, the Lightning module and datamodule, precompute and train stages."""
