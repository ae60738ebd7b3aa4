"""`python -m captioner.inference caption photo.jpg`: the torch-free captioner, even where torch is installed."""

import sys

from .cli import slim_main

sys.exit(slim_main())
