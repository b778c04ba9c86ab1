"""Hostile: sys.exit instead of returning."""
import sys


def run(context) -> None:
    sys.exit(3)
