"""Ray job entrypoint: `ray job submit -- python jobs/direction_fit.py --config F [--set k=v ...]`.

Same as `latentshift direction fit`; on a cluster it connects to the running Ray (RAY_ADDRESS / auto).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("direction-fit", sys.argv[1:]))
