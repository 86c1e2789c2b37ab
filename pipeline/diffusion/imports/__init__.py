"""Conversions of published checkpoints of other architectures to diffusers state dicts (pure torch: no file I/O)."""
