"""Ray job entrypoint: `ray job submit -- python jobs/ood_fit.py --config F [--set k=v ...]`.

Same as `latentshift ood fit`; on a cluster it connects to the running Ray (RAY_ADDRESS).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["ood", "fit", *sys.argv[1:]]))
