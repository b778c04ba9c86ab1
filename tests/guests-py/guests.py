"""Every guest of this folder in one component, so the tests build and compile CPython once instead
of once per guest (each build takes ~13 s and each compile ~15 s here). The handler property
`guest` names the module whose `run(context)` handles the delivery; an unknown or missing name is
an err that lists the known ones."""
import healthy
import hostile_abort
import hostile_exit
import hostile_log_flood
import hostile_loop
import hostile_memory_bomb
import hostile_raise
import hostile_recursion
import hostile_sockets
import wit_world
from componentize_py_types import Err
from wit_world.imports import properties

GUESTS = {
    module.__name__: module
    for module in (
        healthy,
        hostile_abort,
        hostile_exit,
        hostile_log_flood,
        hostile_loop,
        hostile_memory_bomb,
        hostile_raise,
        hostile_recursion,
        hostile_sockets,
    )
}


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context) -> None:
        name = properties.get("guest")
        guest = GUESTS.get(name or "")
        if guest is None:
            raise Err(f"no guest named {name!r}; set the property `guest` to one of {sorted(GUESTS)}")
        guest.run(context)
