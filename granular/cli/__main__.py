"""``python -m granular.cli``: the ``granular`` command (as under ``torch.distributed.run -m``)."""

import sys

from granular.cli import main

sys.exit(main())
