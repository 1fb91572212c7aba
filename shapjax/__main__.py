"""``python -m shapjax``: the ``shapjax`` command (:func:`shapjax.cli.main`)."""

import sys

from shapjax import cli

if __name__ == "__main__":
  sys.exit(cli.main())
