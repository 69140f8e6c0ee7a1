"""`python -m hiermem ...` = `hiermem ...`; what `torchrun --nproc-per-node N -m hiermem train ...` runs."""

import sys

from hiermem.cli import main

sys.exit(main())
