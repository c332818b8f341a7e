"""`python -m serving.batch score ...`: the same as `visionserve score ...`."""

import sys

from serving.cli import main

sys.exit(main(sys.argv[1:]))
