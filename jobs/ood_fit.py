"""Ray job entrypoint: `ray job submit -- python jobs/ood_fit.py --config F [--set k=v ...]`.

Same as `latentshift ood fit`; on a cluster it connects to the running Ray (RAY_ADDRESS).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("ood-fit", sys.argv[1:]))
