// Hostile: throws a value that is neither a string nor an Error (the err type is string).
export function runHandler(context) {
    throw { code: context.currentRetryCount };
}
