// Hostile: a JavaScript runtime error (reading a property of undefined), uncaught.
export function runHandler(context) {
    const missing = context.noSuchField;
    return missing.length;
}
