"""Hostile: an infinite loop; only the engine's time limit stops it."""


def run(context) -> None:
    n = 0
    while True:
        n = (n + context.current_retry_count + 1) % 1000003
