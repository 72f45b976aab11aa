"""``torchrun --nproc-per-node N -m deepmemory.train [deepmemory train options]``."""

import sys

from .command import main

sys.exit(main(sys.argv[1:]))
