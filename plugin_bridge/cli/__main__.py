"""``python -m plugin_bridge.cli``: the ``unbake`` command."""
import sys

from plugin_bridge.cli import main

sys.exit(main())
