"""Hostile: unbounded recursion (Python's own limit is raised so the wasm stack is hit first)."""
import sys

import wit_world


def down(n):
    return down(n + 1) + 1


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        sys.setrecursionlimit(10**6)
        down(0)
