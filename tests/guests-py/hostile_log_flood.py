"""Hostile: a flood of log lines (the engine keeps a bounded number and counts the rest)."""
from wit_world.imports import log


def run(context) -> None:
    line = "x" * 1000
    for i in range(20000):
        log.log(log.Level.INFO, f"{i} {line}")
