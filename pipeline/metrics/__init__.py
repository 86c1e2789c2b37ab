"""Image quality and shape metrics."""
