"""A healthy handler: logs two context fields and succeeds (the baseline for the hostile ones)."""
import wit_world
from wit_world.imports import log


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        log.log(log.Level.INFO, f"JobType: {context.job_type}")
        log.log(log.Level.INFO, f"JobResult: {context.job_result.name}")
