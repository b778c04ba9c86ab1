// Hostile: an infinite loop; only the engine's time limit stops it.
export function runHandler(context) {
    let n = 0;
    for (;;) {
        n = (n + context.currentRetryCount + 1) % 1000003;
    }
}
