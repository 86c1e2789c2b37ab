"""Bytes, Arrow and storage: shards, images, latent Parquet, ledger, filesystems. No torch models."""
