"""The demo: shape domains, the bundled models' trainer, and the end-to-end run with its report."""
