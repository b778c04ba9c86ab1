// Hostile: allocates without bound (arrays of a million numbers, kept alive).
export function runHandler(context) {
    const keep = [];
    for (;;) {
        keep.push(new Array(1 << 20).fill(context.currentRetryCount + 1));
    }
}
