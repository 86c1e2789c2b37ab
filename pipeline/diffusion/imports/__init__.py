"""Importers of published checkpoints: pure state-dict mappings onto diffusers models."""
