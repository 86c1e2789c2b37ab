"""Ray Data stages: callables that wrap diffusion/ and data/ for batches of rows.

Rows flowing between stages (numpy batches):
  read    → shard, key, index, image (bytes), extras (JSON of carried members), error
  decode  → shard, key, index, extras, error, pixels (uint8 S×S×3)
  model   → shard, key, index, step, error, extras, payload (bytes), shape, info (JSON)
            step −1 is the sample row (payload: output pixels, or empty for encode);
            steps 0…K are latent rows (payload: one latent map), so rows stay small
  write   → one manifest row per staged part (small: all the driver ever sees)
"""
