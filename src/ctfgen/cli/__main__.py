"""`python -m ctfgen.cli ...`: how torchrun starts the command (`torchrun ... -m ctfgen.cli train ...`)."""

import sys

from ctfgen.cli import main

sys.exit(main())
