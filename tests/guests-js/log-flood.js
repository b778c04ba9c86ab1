// Hostile: a flood of log lines (the engine keeps a bounded number and counts the rest).
import * as log from "jobhook:handler/log@0.2.0";

export function runHandler(context) {
    const line = "x".repeat(1000);
    for (let i = 0; i < 20000; i++) {
        log.log("info", `${i} ${line}`);
    }
}
