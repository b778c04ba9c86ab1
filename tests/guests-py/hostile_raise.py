"""Hostile: an uncaught Python exception (not the componentize_py_types.Err the world expects)."""


def run(context) -> None:
    raise RuntimeError(f"boom in {context.job_type}")
