"""Ray job entrypoint: `ray job submit -- python jobs/decode.py --config F [--set k=v ...]`.

Same as `latentshift decode`; on a cluster it connects to the running Ray (RAY_ADDRESS / auto).
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
