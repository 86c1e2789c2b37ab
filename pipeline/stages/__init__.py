"""Ray Data stages: callables that wrap diffusion/ and data/ for batches of rows.

  read.py     one task per shard (or latent file) → INPUT rows; tells the ledger the row count
  images.py   CPU tasks: image bytes → fixed-size uint8 pixels (or a REJECT row)
  codec.py    actor pools: encode / translate / decode latents
  ood.py      actor pools: invert and fit (PARTIAL rows for the driver); decode sampled latents
  write.py    CPU tasks: stage parts per shard through the ledger → one manifest row per part
  base.py     what every model stage shares (model loading, prepare → compute → emit under a device lock, rejects, LATENT rows)

The columns of each boundary are defined once, in ``pipeline.data.rows``.
"""
