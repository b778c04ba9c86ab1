// Hostile: unbounded recursion.
function down(n) {
    return down(n + 1) + 1;
}

export function runHandler(context) {
    return down(context.currentRetryCount);
}
