"""Ray job entrypoint: `ray job submit -- python jobs/guide.py --config F [--set k=v ...]`.

Same as `latentshift guide`; on a cluster it connects to the running Ray (RAY_ADDRESS / auto).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("guide", sys.argv[1:]))
