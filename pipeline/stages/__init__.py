"""Ray Data stages: callables that wrap diffusion/ and data/ for batches of rows.

  read.py     one task per shard (or latent file, or score's output/input pair) → rows; tells the ledger
              the row count
  images.py   CPU tasks: image bytes (of a pair too) → fixed-size uint8 pixels (or a REJECT row)
  codec.py    encode / translate / decode as device functions, and the actor-pool stages made of them
  ood.py      actor pools: invert and fit (PARTIAL rows for the driver); decode sampled latents
  hspace.py   actor pools: h-space direction fit (PARTIAL rows) and edit (Asyrp)
  search.py   actor pool: CycleDiffusion's zero-shot search (best candidate by directional CLIP)
  score.py    actor pool: the score job's CLIP scores (the Scorer is pipeline/metrics/scorer.py)
  guide.py    actor pool: Langevin guidance in latent space, images from numbers
  write.py    CPU tasks: stage parts per shard through the ledger → one manifest row per part
  tensors.py  uint8 image batches ↔ model tensors, on any device
  base.py     what every model stage shares (model loading, prepare → compute → emit under a device
              lock with two batches in flight, the largest batch that fits, rejects, LATENT rows)

The columns of each boundary are defined once, in ``pipeline.data.rows``.
"""
