"""Tools that measure the pipeline: `latentshift bench`."""
