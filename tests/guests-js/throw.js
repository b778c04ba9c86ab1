// Hostile: the handler throws an Error object (not the string its err type expects).
export function runHandler(context) {
    throw new Error(`boom in ${context.jobType}`);
}
