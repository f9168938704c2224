"""`python -m proxy run …`: the same CLI as `circuit-proxy`."""

import sys

from proxy.cli import main

sys.exit(main())
