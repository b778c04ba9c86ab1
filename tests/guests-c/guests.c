// Hostile (and one healthy) C guests in one component, for host/tests/languages.rs: the handler
// property `guest` names the one that handles the delivery; an unknown or missing name is an err
// that lists the known ones. Each does what a careless or hostile C handler may do; the tests
// check the outcome class docs/LANGUAGES.md gives for it. Built by build.sh against the
// `jobhook new --lang c` template's bindings (the `handler` world).

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler.h"

static volatile unsigned sink;

static void log_line(const char *text) {
  handler_string_t message = {(uint8_t *)text, strlen(text)};
  jobhook_handler_log_log(JOBHOOK_HANDLER_LOG_LEVEL_INFO, &message);
}

static bool healthy(handler_string_t *err) {
  (void)err;
  log_line("healthy");
  return true;
}

// Never returns: the handler's budget ends it.
static bool spin(handler_string_t *err) {
  (void)err;
  for (;;) sink++;
}

// Allocates and touches 1 MiB at a time until the engine refuses to grow memory.
static bool memory_bomb(handler_string_t *err) {
  for (;;) {
    char *block = malloc(1 << 20);
    if (!block) {
      handler_string_dup(err, "malloc returned NULL");
      return false;
    }
    memset(block, 1, 1 << 20);
    sink += (unsigned char)block[4096];
  }
}

static unsigned descend(unsigned depth) {
  volatile char frame[512];
  frame[0] = (char)depth;
  return descend(depth + 1) + (unsigned char)frame[0];
}

// Recurses without end: wasi-libc's stack has no guard page.
static bool recursion(handler_string_t *err) {
  (void)err;
  sink = descend(0);
  return true;
}

static bool do_abort(handler_string_t *err) {
  (void)err;
  abort();
}

static bool do_exit(handler_string_t *err) {
  (void)err;
  exit(3);
}

// Far more lines than the log budget keeps.
static bool log_flood(handler_string_t *err) {
  (void)err;
  for (int i = 0; i < 20000; i++) log_line("flood");
  return true;
}

static const struct {
  const char *name;
  bool (*run)(handler_string_t *err);
} GUESTS[] = {
    {"abort", do_abort},         {"exit", do_exit},
    {"healthy", healthy},        {"log-flood", log_flood},
    {"loop", spin},              {"memory-bomb", memory_bomb},
    {"recursion", recursion},
};

bool exports_handler_run_handler(handler_job_context_t *context, handler_string_t *err) {
  handler_job_context_free(context);
  handler_string_t key = {(uint8_t *)"guest", 5};
  handler_string_t name;
  bool named = jobhook_handler_properties_get(&key, &name);
  for (size_t i = 0; named && i < sizeof GUESTS / sizeof GUESTS[0]; i++) {
    if (name.len == strlen(GUESTS[i].name) && memcmp(name.ptr, GUESTS[i].name, name.len) == 0) {
      handler_string_free(&name);
      return GUESTS[i].run(err);
    }
  }
  if (named) handler_string_free(&name);
  handler_string_dup(err, "no such guest; set the property `guest` to one of abort, exit, healthy, "
                          "log-flood, loop, memory-bomb, recursion");
  return false;
}
