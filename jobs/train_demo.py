"""Train a bundled demo model: `python jobs/train_demo.py --domain discs [--steps N]`.

Same as `latentshift train-demo`; resumes from its checkpoint when one exists.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-demo", *sys.argv[1:]]))
