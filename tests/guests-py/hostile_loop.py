"""Hostile: an infinite loop; only the engine's time limit stops it."""
import wit_world


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        n = 0
        while True:
            n = (n + context.current_retry_count + 1) % 1000003
