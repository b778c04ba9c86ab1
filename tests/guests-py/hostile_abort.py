"""Hostile: os.abort()."""
import os

import wit_world


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        os.abort()
