"""`python -m hf_dppf.cli COMMAND ...`: the same as the `hf-dppf` console script."""

import sys

from . import main

sys.exit(main())
