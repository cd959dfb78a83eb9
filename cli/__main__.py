"""``python -m nec_cli``."""

import sys

from nec_cli.main import main

sys.exit(main())
