/* The GCRA limiter shared through Redis, against the real Redis of
 * KEEL_TEST_REDIS: decisions and Retry-After, tenants apart, close with
 * takes in flight, and three processes sharing one budget for 10 s. */
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "keel/ratelimit.h"
#include "support/harness.h"

typedef struct ctx {
  uv_loop_t loop;
  keel_redis *r;
  keel_ratelimit_redis *rl;
  char prefix[96];
  int answers;
  int status[64];
  uint64_t after[64];
  uint64_t remaining[64];
  int closed;
  bool close_in_cb;
} ctx;

static void open_ctx(ctx *x, uint64_t rate, uint64_t burst) {
  memset(x, 0, sizeof *x);
  cr_assert_eq(uv_loop_init(&x->loop), 0);
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", host, port);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  cr_assert_eq(keel_redis_new(&x->loop, &o, &x->r), 0);
  kt_unique_name(x->prefix, sizeof x->prefix, "rl");
  strncat(x->prefix, ":", sizeof x->prefix - strlen(x->prefix) - 1);
  keel_ratelimit_redis_opts ro;
  keel_ratelimit_redis_opts_init(&ro);
  ro.rate = rate;
  ro.burst = burst;
  ro.prefix = x->prefix;
  cr_assert_eq(keel_ratelimit_redis_new(x->r, &ro, &x->rl), 0);
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((ctx *)data)->closed++;
}

static void close_ctx(ctx *x) {
  keel_ratelimit_redis_close(x->rl, on_closed, x);
  keel_redis_close(x->r, NULL, NULL);
  kt_loop_finish(&x->loop);
}

static void on_take(keel_ratelimit_redis *rl, int status, uint64_t after, uint64_t remaining,
                    void *data) {
  ctx *x = data;
  cr_assert_eq(rl, x->rl);
  if (x->answers < 64) {
    x->status[x->answers] = status;
    x->after[x->answers] = after;
    x->remaining[x->answers] = remaining;
  }
  x->answers++;
  if (x->close_in_cb) keel_ratelimit_redis_close(rl, on_closed, x);
}

static bool answered(void *arg) {
  ctx *x = arg;
  return x->answers >= x->status[63];
}

static void wait_answers(ctx *x, int n) {
  x->status[63] = n;
  cr_assert(kt_wait_for(&x->loop, answered, x, 10000), "only %d of %d answers", x->answers, n);
}

Test(ratelimit_redis, burst_then_retry_after_per_tenant) {
  ctx x;
  open_ctx(&x, 10, 3); /* 10/s, bursts of 3: one every 100 ms */
  for (int i = 0; i < 4; i++)
    cr_assert_eq(keel_ratelimit_redis_take(x.rl, "tenant-a", 1, on_take, &x), 0);
  cr_assert_eq(x.answers, 0, "answered inside take");
  wait_answers(&x, 4);
  for (int i = 0; i < 3; i++) cr_assert_eq(x.status[i], 0, "take %d: %d", i, x.status[i]);
  cr_assert_eq(x.remaining[0], 2);
  cr_assert_eq(x.remaining[2], 0);
  cr_assert_eq(x.status[3], KEEL_ERATELIMIT);
  cr_assert(x.after[3] >= 1 && x.after[3] <= 100, "retry after %llu",
            (unsigned long long)x.after[3]);
  /* another tenant has its own budget */
  x.answers = 0;
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "tenant-b", 3, on_take, &x), 0);
  wait_answers(&x, 1);
  cr_assert_eq(x.status[0], 0);
  /* after the Retry-After, tenant-a may go again */
  usleep((useconds_t)(x.after[3] + 5) * 1000);
  x.answers = 0;
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "tenant-a", 1, on_take, &x), 0);
  wait_answers(&x, 1);
  cr_assert_eq(x.status[0], 0);
  keel_ratelimit_redis_stats st;
  keel_ratelimit_redis_get_stats(x.rl, &st);
  cr_assert_eq(st.allowed, 5);
  cr_assert_eq(st.rejected, 1);
  cr_assert_eq(st.errors, 0);
  cr_assert_eq(st.in_flight, 0);
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "t", 0, on_take, &x), UV_EINVAL);
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "t", 4, on_take, &x), UV_EINVAL);
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, NULL, 1, on_take, &x), UV_EINVAL);
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "t", 1, NULL, &x), UV_EINVAL);
  close_ctx(&x);
  cr_assert_eq(x.closed, 1);
}

Test(ratelimit_redis, close_with_takes_in_flight_and_from_a_callback) {
  ctx x;
  open_ctx(&x, 100, 100);
  for (int i = 0; i < 5; i++) cr_assert_eq(keel_ratelimit_redis_take(x.rl, "t", 1, on_take, &x), 0);
  keel_ratelimit_redis_close(x.rl, on_closed, &x);
  keel_ratelimit_redis_close(x.rl, on_closed, &x);
  cr_assert_eq(keel_ratelimit_redis_take(x.rl, "t", 1, on_take, &x), KEEL_ECLOSING);
  cr_assert_eq(x.closed, 0);
  wait_answers(&x, 5);
  for (int i = 0; i < 5; i++) cr_assert_eq(x.status[i], UV_ECANCELED);
  keel_redis_close(x.r, NULL, NULL);
  kt_loop_finish(&x.loop);
  cr_assert_eq(x.closed, 1);

  ctx y;
  open_ctx(&y, 100, 100);
  y.close_in_cb = true;
  for (int i = 0; i < 3; i++) cr_assert_eq(keel_ratelimit_redis_take(y.rl, "t", 1, on_take, &y), 0);
  wait_answers(&y, 3);
  cr_assert_eq(y.status[0], 0, "the first answer came before the close");
  cr_assert_eq(y.status[1], UV_ECANCELED);
  keel_redis_close(y.r, NULL, NULL);
  kt_loop_finish(&y.loop);
  cr_assert_eq(y.closed, 1);
}

Test(ratelimit_redis, bad_options) {
  keel_ratelimit_redis_opts o;
  keel_ratelimit_redis_opts_init(&o);
  cr_assert_str_eq(o.prefix, "keel:rl:");
  keel_ratelimit_redis *rl = (keel_ratelimit_redis *)0x1;
  cr_assert_eq(keel_ratelimit_redis_new(NULL, &o, &rl), UV_EINVAL);
  cr_assert_eq(rl, (keel_ratelimit_redis *)0x1);
  keel_ratelimit_redis_close(NULL, NULL, NULL);
}

/* ---- three processes, one budget ------------------------------------------ */

#define PROCS 3
#define RATE 100
#define BURST 10
#define SECONDS 10

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

typedef struct hammer {
  ctx x;
  uint64_t end_ms;
  long allowed, rejected, errors;
  int in_flight;
} hammer;

static void h_send(hammer *h);

static void h_answer(keel_ratelimit_redis *rl, int status, uint64_t after, uint64_t remaining,
                     void *data) {
  (void)rl;
  (void)after;
  (void)remaining;
  hammer *h = data;
  h->in_flight--;
  if (status == 0)
    h->allowed++;
  else if (status == KEEL_ERATELIMIT)
    h->rejected++;
  else
    h->errors++;
  h_send(h);
}

static void h_send(hammer *h) {
  if (mono_ms() >= h->end_ms) return;
  if (keel_ratelimit_redis_take(h->x.rl, "shared", 1, h_answer, h) == 0)
    h->in_flight++;
  else
    h->errors++;
}

static void run_child(const char *prefix, uint64_t start_ms, int fd) {
  hammer h;
  memset(&h, 0, sizeof h);
  cr_assert_eq(uv_loop_init(&h.x.loop), 0);
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  char url[128];
  snprintf(url, sizeof url, "redis://%s:%d", host, port);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  if (keel_redis_new(&h.x.loop, &o, &h.x.r) != 0) _exit(2);
  keel_ratelimit_redis_opts ro;
  keel_ratelimit_redis_opts_init(&ro);
  ro.rate = RATE;
  ro.burst = BURST;
  ro.prefix = prefix;
  if (keel_ratelimit_redis_new(h.x.r, &ro, &h.x.rl) != 0) _exit(2);
  while (mono_ms() < start_ms) usleep(1000);
  h.end_ms = start_ms + SECONDS * 1000;
  for (int i = 0; i < 8; i++) h_send(&h);
  while (h.in_flight > 0) uv_run(&h.x.loop, UV_RUN_ONCE);
  keel_ratelimit_redis_close(h.x.rl, NULL, NULL);
  keel_redis_close(h.x.r, NULL, NULL);
  uv_run(&h.x.loop, UV_RUN_DEFAULT);
  long out[3] = {h.allowed, h.rejected, h.errors};
  if (write(fd, out, sizeof out) != (ssize_t)sizeof out) _exit(3);
  _exit(0);
}

Test(ratelimit_redis, shared_by_3_processes_never_exceeds_rate_plus_one_burst, .timeout = 60) {
  char prefix[96];
  kt_unique_name(prefix, sizeof prefix, "rl3");
  strncat(prefix, ":", sizeof prefix - strlen(prefix) - 1);
  uint64_t start_ms = mono_ms() + 500;
  int fds[PROCS][2];
  pid_t pids[PROCS];
  for (int i = 0; i < PROCS; i++) {
    cr_assert_eq(pipe(fds[i]), 0);
    pids[i] = fork();
    cr_assert_geq(pids[i], 0);
    if (pids[i] == 0) {
      close(fds[i][0]);
      run_child(prefix, start_ms, fds[i][1]);
    }
    close(fds[i][1]);
  }
  long allowed = 0, rejected = 0, errors = 0;
  for (int i = 0; i < PROCS; i++) {
    long out[3];
    cr_assert_eq(read(fds[i][0], out, sizeof out), (ssize_t)sizeof out, "child %d reported", i);
    close(fds[i][0]);
    int st;
    waitpid(pids[i], &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    cr_assert_gt(out[0], 0, "child %d got some of the budget", i);
    allowed += out[0];
    rejected += out[1];
    errors += out[2];
  }
  cr_log_info("3 processes, %d s at %d/s burst %d: %ld allowed, %ld rejected", SECONDS, RATE, BURST,
              allowed, rejected);
  cr_assert_eq(errors, 0);
  cr_assert_gt(rejected, 0, "the processes asked for more than the rate");
  /* Decisions fall in [start, end + one round trip]: allow 50 ms of tail. */
  long bound = RATE * SECONDS + BURST + RATE / 20;
  cr_assert_leq(allowed, bound, "allowed %ld > %ld over %d s", allowed, bound, SECONDS);
  cr_assert_geq(allowed, RATE * SECONDS * 9 / 10, "allowed only %ld", allowed);
}
