"""Ray job entrypoint: `ray job submit -- python jobs/gallery.py --config F [--set k=v ...]`.

Same as `latentshift gallery`; on a cluster it connects to the running Ray (RAY_ADDRESS / auto).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("gallery", sys.argv[1:]))
