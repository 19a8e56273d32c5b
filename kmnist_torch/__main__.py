"""``python -m kmnist_torch``: see :mod:`kmnist_torch.cli`."""

import sys

from .cli import main

sys.exit(main())
