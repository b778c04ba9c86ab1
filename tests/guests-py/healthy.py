"""A healthy handler: logs two context fields and succeeds (the baseline for the hostile ones)."""
from wit_world.imports import log


def run(context) -> None:
    log.log(log.Level.INFO, f"JobType: {context.job_type}")
    log.log(log.Level.INFO, f"JobResult: {context.job_result.name}")
