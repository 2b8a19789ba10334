"""``python -m nfnets`` (and ``torchrun -m nfnets train``) runs the ``nfnets`` command."""

import sys

from .cli import main

sys.exit(main())
