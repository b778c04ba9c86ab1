"""Hostile: an uncaught Python exception (not the componentize_py_types.Err the world expects)."""
import wit_world


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        raise RuntimeError(f"boom in {context.job_type}")
