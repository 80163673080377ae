"""Backbones, decoders and the multi-task model."""
