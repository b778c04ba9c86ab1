// Every guest of this folder in one component, so the tests build and compile QuickJS once
// instead of once per guest. The handler property `guest` names the module whose `runHandler`
// handles the delivery; an unknown or missing name is an err that lists the known ones.
import * as properties from "jobhook:handler/properties@0.2.0";
import * as healthy from "./healthy.js";
import * as logFlood from "./log-flood.js";
import * as loop from "./loop.js";
import * as memoryBomb from "./memory-bomb.js";
import * as recursion from "./recursion.js";
import * as throwValue from "./throw-value.js";
import * as throwError from "./throw.js";
import * as typeError from "./type-error.js";

const GUESTS = {
    "healthy": healthy,
    "log-flood": logFlood,
    "loop": loop,
    "memory-bomb": memoryBomb,
    "recursion": recursion,
    "throw-value": throwValue,
    "throw": throwError,
    "type-error": typeError,
};

export function runHandler(context) {
    const name = properties.get("guest");
    const guest = Object.hasOwn(GUESTS, name ?? "") ? GUESTS[name] : undefined;
    if (guest === undefined) {
        throw `no guest named ${JSON.stringify(name)}; set the property \`guest\` to one of ${Object.keys(GUESTS).sort().join(", ")}`;
    }
    return guest.runHandler(context);
}
