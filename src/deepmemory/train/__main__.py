"""``torchrun --nproc-per-node N -m deepmemory.train [deepmemory train options]``."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
