"""Ray job entrypoint: `ray job submit -- python jobs/eval.py --config F [--set k=v ...]`.

Same as `latentshift eval`; on a cluster it connects to the running Ray (RAY_ADDRESS / auto).
"""

import sys

from pipeline.cli import run_registered

if __name__ == "__main__":
    sys.exit(run_registered("eval", sys.argv[1:]))
