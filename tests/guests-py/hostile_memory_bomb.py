"""Hostile: allocates without bound (lists of a million ints, kept alive)."""


def run(context) -> None:
    keep = []
    while True:
        keep.append([context.current_retry_count + 1] * (1 << 20))
