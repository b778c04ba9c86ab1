"""Hostile: allocates without bound (lists of a million ints, kept alive)."""
import wit_world


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        keep = []
        while True:
            keep.append([context.current_retry_count + 1] * (1 << 20))
