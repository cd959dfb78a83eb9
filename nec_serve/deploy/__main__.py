"""``python -m nec_serve.deploy``: the ``deploy`` subcommand on its own."""

import sys

from nec_serve.deploy.command import main

sys.exit(main())
