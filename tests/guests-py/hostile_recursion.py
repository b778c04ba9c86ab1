"""Hostile: unbounded recursion (Python's own limit is raised so the wasm stack is hit first)."""
import sys


def down(n):
    return down(n + 1) + 1


def run(context) -> None:
    sys.setrecursionlimit(10**6)
    down(0)
