/* Idempotency scenarios shared by the PostgreSQL and the Redis suites: the
 * including file defines store_open(fx *) (creates f->idem on f->loop with
 * f->opts, and whatever client it needs) and store_close(fx *). */
#ifndef KT_IDEM_SCENARIOS_H
#define KT_IDEM_SCENARIOS_H

#include <criterion/criterion.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keel/idempotency.h"
#include "support/harness.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

typedef struct fx {
  uv_loop_t loop;
  keel_idem *idem;
  keel_idem_opts opts;
  void *client; /* the pool or the Redis client */
  void *client2;
  char scope[64];
  int done, owners, busy, mismatches, replays, errors, lost, ok;
  int last_error;
  bool taken_over;
  keel_idem_token token;
  int status;
  char body[256];
  size_t body_len;
  bool body_cached;
  uint64_t ttl_ms;
} fx;

static void store_open(fx *f);
static void store_close(fx *f);

static void fx_init(fx *f) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  keel_idem_opts_init(&f->opts);
  kt_unique_name(f->scope, sizeof f->scope, "idem");
}

static void fx_finish(fx *f) {
  store_close(f);
  kt_loop_finish(&f->loop);
}

static void on_begin(keel_idem *idem, int status, const keel_idem_reply *r, void *data) {
  (void)idem;
  fx *f = data;
  f->done++;
  if (status == 0 && !r->completed) {
    f->owners++;
    f->token = r->token;
    f->taken_over = r->taken_over;
  } else if (status == 0) {
    f->replays++;
    f->status = r->response_status;
    f->body_cached = r->body_cached;
    f->body_len = r->body_len < sizeof f->body ? r->body_len : sizeof f->body;
    if (r->body_len > 0) memcpy(f->body, r->body, f->body_len);
  } else if (status == KEEL_EINPROGRESS) {
    f->busy++;
    cr_assert_not_null(r);
    cr_assert_not(r->completed);
    cr_assert_eq(r->token.hex[0], '\0', "no token with a busy answer");
    f->ttl_ms = r->ttl_ms;
  } else if (status == KEEL_EMISMATCH) {
    f->mismatches++;
  } else {
    f->errors++;
    f->last_error = status;
  }
}

static void on_done(keel_idem *idem, int status, void *data) {
  (void)idem;
  fx *f = data;
  f->done++;
  if (status == 0)
    f->ok++;
  else if (status == KEEL_ELOST)
    f->lost++;
  else {
    f->errors++;
    f->last_error = status;
  }
}

static bool all_done(void *ctx) {
  fx *f = ctx;
  return f->done == 0;
}

/* Runs until n more callbacks came. */
static void wait_n(fx *f, int n) {
  int target = f->done + n;
  int *done = &f->done;
  (void)done;
  uint64_t start = uv_now(&f->loop);
  while (f->done < target && uv_now(&f->loop) - start < 30000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(f->done, target, "%d of %d callbacks (last error %s: %s)", f->done, target,
               keel_err_name(f->last_error), keel_idem_last_error(f->idem));
  (void)all_done;
}

static void reset_counts(fx *f) {
  f->owners = f->busy = f->mismatches = f->replays = f->errors = f->lost = f->ok = 0;
}

static void begins(fx *f, int n, const char *key, const char *fp) {
  reset_counts(f);
  for (int i = 0; i < n; i++)
    cr_assert_eq(keel_idem_begin(f->idem, f->scope, key, fp, on_begin, f), 0, "%s",
                 keel_idem_last_error(f->idem));
  wait_n(f, n);
  cr_assert_eq(f->errors, 0, "errors: last %s: %s", keel_err_name(f->last_error),
               keel_idem_last_error(f->idem));
}

static int complete(fx *f, const char *key, const keel_idem_token *t, int code, const char *body,
                    size_t len) {
  reset_counts(f);
  cr_assert_eq(keel_idem_complete(f->idem, f->scope, key, t, code, body, len, on_done, f), 0);
  wait_n(f, 1);
  return f->ok ? 0 : f->lost ? KEEL_ELOST : f->last_error;
}

static int abort_key(fx *f, const char *key, const keel_idem_token *t) {
  reset_counts(f);
  cr_assert_eq(keel_idem_abort(f->idem, f->scope, key, t, on_done, f), 0);
  wait_n(f, 1);
  return f->ok ? 0 : f->lost ? KEEL_ELOST : f->last_error;
}

/* 100 concurrent identical begins: exactly one owner, the others busy;
 * after complete, the stored response; another fingerprint: mismatch. */
static void scenario_concurrent(fx *f) {
  begins(f, 100, "k1", "fp-a");
  cr_assert_eq(f->owners, 1);
  cr_assert_eq(f->busy, 99);
  keel_idem_token owner = f->token;
  begins(f, 1, "k1", "fp-b");
  cr_assert_eq(f->mismatches, 1, "processing + other fingerprint: mismatch");
  const char body[] = "{\"id\":7}\0binary";
  cr_assert_eq(complete(f, "k1", &owner, 201, body, sizeof body), 0);
  begins(f, 100, "k1", "fp-a");
  cr_assert_eq(f->replays, 100);
  cr_assert_eq(f->status, 201);
  cr_assert(f->body_cached);
  cr_assert_eq(f->body_len, sizeof body);
  cr_assert_eq(memcmp(f->body, body, sizeof body), 0);
  begins(f, 1, "k1", "fp-b");
  cr_assert_eq(f->mismatches, 1, "completed + other fingerprint: mismatch");
  /* The owner cannot complete twice, nobody else can abort it. */
  cr_assert_eq(complete(f, "k1", &owner, 500, "x", 1), KEEL_ELOST);
  cr_assert_eq(abort_key(f, "k1", &owner), KEEL_ELOST);
  keel_idem_stats st;
  keel_idem_get_stats(f->idem, &st);
  cr_assert_eq(st.begins, 202);
  cr_assert_eq(st.owned, 1);
  cr_assert_eq(st.busy, 99);
  cr_assert_eq(st.replays, 100);
  cr_assert_eq(st.mismatches, 2);
  cr_assert_eq(st.completes, 1);
  cr_assert_eq(st.lost, 2);
  cr_assert_eq(st.in_flight, 0);
}

/* abort frees the key; a body over max_body is not cached (the status is);
 * a token-less complete is refused. */
static void scenario_abort_and_large(fx *f) {
  begins(f, 1, "k2", "fp");
  cr_assert_eq(f->owners, 1);
  keel_idem_token t = f->token;
  cr_assert_eq(abort_key(f, "k2", &t), 0);
  cr_assert_eq(abort_key(f, "k2", &t), 0, "already free");
  cr_assert_eq(complete(f, "k2", &t, 200, "x", 1), KEEL_ELOST);
  begins(f, 1, "k2", "other");
  cr_assert_eq(f->owners, 1, "free again after abort, any fingerprint");
  t = f->token;
  keel_idem_token bad = t;
  bad.hex[0] = bad.hex[0] == 'a' ? 'b' : 'a';
  cr_assert_eq(complete(f, "k2", &bad, 200, "x", 1), KEEL_ELOST);
  cr_assert_eq(abort_key(f, "k2", &bad), KEEL_ELOST);
  size_t big = f->opts.max_body + 1;
  char *body = calloc(1, big);
  cr_assert_eq(complete(f, "k2", &t, 200, body, big), 0);
  free(body);
  begins(f, 1, "k2", "other");
  cr_assert_eq(f->replays, 1);
  cr_assert_eq(f->status, 200);
  cr_assert_not(f->body_cached);
  cr_assert_eq(f->body_len, 0);
  keel_idem_stats st;
  keel_idem_get_stats(f->idem, &st);
  cr_assert_eq(st.bodies_too_large, 1);
  cr_assert_eq(st.aborts, 2);
  /* Bad input is refused without a callback. */
  char longkey[300];
  memset(longkey, 'k', sizeof longkey - 1);
  longkey[sizeof longkey - 1] = '\0';
  cr_assert_eq(keel_idem_begin(f->idem, f->scope, longkey, "fp", on_begin, f), UV_EINVAL);
  longkey[255] = '\0';
  begins(f, 1, longkey, "fp");
  cr_assert_eq(f->owners, 1, "a 255-byte key is fine");
  cr_assert_eq(keel_idem_begin(f->idem, "", "k", "fp", on_begin, f), UV_EINVAL);
  cr_assert_eq(keel_idem_begin(f->idem, f->scope, "k", "fp", NULL, f), UV_EINVAL);
  bad.hex[3] = 'Z';
  cr_assert_eq(keel_idem_complete(f->idem, f->scope, "k", &bad, 200, "", 0, NULL, NULL), UV_EINVAL);
}

/* A complete after the processing TTL ran out is lost; the key is free. */
static void scenario_ttl(fx *f) {
  begins(f, 1, "k3", "fp");
  cr_assert_eq(f->owners, 1);
  keel_idem_token t = f->token;
  begins(f, 1, "k3", "fp");
  cr_assert_eq(f->busy, 1);
  cr_assert(f->ttl_ms > 0 && f->ttl_ms <= f->opts.processing_ttl_ms, "ttl_ms %llu",
            (unsigned long long)f->ttl_ms);
  uv_sleep((unsigned)f->opts.processing_ttl_ms + 100);
  uv_update_time(&f->loop);
  cr_assert_eq(complete(f, "k3", &t, 200, "late", 4), KEEL_ELOST);
  begins(f, 1, "k3", "fp");
  cr_assert_eq(f->owners, 1);
}

static bool read_byte(int fd, char *c, int timeout_ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  if (poll(&p, 1, timeout_ms) != 1) return false;
  return read(fd, c, 1) == 1;
}

/* The owner (a forked process) is killed with SIGKILL after its begin:
 * the key stays busy until the processing TTL, then exactly one of many
 * retrying callers owns it (one re-execution), the rest see busy and then
 * the stored response. */
static void scenario_owner_killed(fx *f, uint64_t ttl_ms) {
  int fds[2];
  cr_assert_eq(pipe(fds), 0);
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    close(fds[0]);
    fx child;
    fx_init(&child);
    memcpy(child.scope, f->scope, sizeof child.scope);
    child.opts.processing_ttl_ms = ttl_ms;
    store_open(&child);
    int target = child.done + 1;
    keel_idem_begin(child.idem, child.scope, "crash", "fp", on_begin, &child);
    while (child.done < target) uv_run(&child.loop, UV_RUN_ONCE);
    char c = child.owners == 1 ? 'O' : 'X';
    if (c == 'X')
      fprintf(stderr, "child: %s %s\n", keel_err_name(child.last_error),
              keel_idem_last_error(child.idem));
    if (write(fds[1], &c, 1) != 1) _exit(2);
    for (;;) pause();
  }
  close(fds[1]);
  char c = 0;
  bool got = read_byte(fds[0], &c, 20000);
  uint64_t t0 = uv_hrtime();
  close(fds[0]);
  if (!got || c != 'O') {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    cr_assert_fail("the child did not own the key (%c)", c);
  }
  f->opts.processing_ttl_ms = ttl_ms;
  store_open(f);
  cr_assert_eq(kill(pid, SIGKILL), 0);
  cr_assert_eq(waitpid(pid, NULL, 0), pid);
  begins(f, 5, "crash", "fp");
  uint64_t elapsed_ms = (uv_hrtime() - t0) / 1000000;
  if (elapsed_ms + 200 < ttl_ms) cr_assert_eq(f->busy, 5, "busy while the dead owner's TTL runs");
  cr_assert_eq(f->owners, 0);
  /* Retry like clients do: ten concurrent begins every 50 ms. */
  int executions = 0;
  uint64_t owned_at = 0;
  keel_idem_token t;
  for (int round = 0; round < 400 && executions == 0; round++) {
    begins(f, 10, "crash", "fp");
    if (f->owners > 0) {
      executions += f->owners;
      t = f->token;
      owned_at = (uv_hrtime() - t0) / 1000000;
      cr_assert_eq(f->busy, 10 - f->owners);
    } else {
      uv_sleep(50);
    }
  }
  cr_assert_eq(executions, 1, "exactly one re-execution");
  cr_assert_geq(owned_at + 100, ttl_ms, "not before the processing TTL (%llu ms)",
                (unsigned long long)owned_at);
  begins(f, 10, "crash", "fp");
  cr_assert_eq(f->busy, 10, "the new owner is still working");
  cr_assert_eq(complete(f, "crash", &t, 200, "done", 4), 0);
  begins(f, 10, "crash", "fp");
  cr_assert_eq(f->replays, 10);
  cr_assert_eq(f->owners, 0);
}

#endif
