"""Hostile: sys.exit instead of returning."""
import sys

import wit_world


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        sys.exit(3)
