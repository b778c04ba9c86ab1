"""Hostile: os.abort()."""
import os


def run(context) -> None:
    os.abort()
