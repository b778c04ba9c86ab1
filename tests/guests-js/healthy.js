// A healthy handler: logs two context fields and succeeds (the baseline for the hostile ones).
import * as log from "jobhook:handler/log@0.2.0";

export function runHandler(context) {
    log.log("info", `JobType: ${context.jobType}`);
    log.log("info", `JobResult: ${context.jobResult}`);
}
