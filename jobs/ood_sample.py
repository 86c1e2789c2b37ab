"""Ray job entrypoint: `ray job submit -- python jobs/ood_sample.py --config F [--set k=v ...]`.

Same as `latentshift ood sample`; on a cluster it connects to the running Ray (RAY_ADDRESS).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("ood-sample", sys.argv[1:]))
