/* Distributed locks against real Redis servers and real processes: fences,
 * release outcomes, extend, the watchdog, a holder killed or stopped, many
 * processes on one key guarding a read-modify-write in PostgreSQL,
 * Redlock with servers stopped, close from inside every callback and
 * allocation failure. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keel/redis.h"
#include "redis_server.h"
#include "support/harness.h"

typedef struct lctx {
  uv_loop_t loop;
  keel_redis *r;
  keel_redis_lock *lock;
  int acq_status; /* 1: not yet */
  int rel_status;
  int ext_status;
  int lost_status;
  int lost_calls;
  uint64_t lost_at;          /* uv_now at on_lost */
  uint64_t lost_valid_until; /* keel_redis_lock_valid_until at on_lost */
  int acq_calls;
  bool rel_taken;
  uint64_t fence;
  bool closed;
  bool close_in_acquire, close_in_release, close_in_lost, close_in_extend, close_in_state;
} lctx;

static void shared_url(char *buf, size_t cap) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  snprintf(buf, cap, "redis://%s:%d", host, port);
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((lctx *)data)->closed = true;
}

static void on_state(keel_redis *r, keel_redis_state st, int status, void *data) {
  (void)status;
  lctx *x = data;
  if (x->close_in_state && st == KEEL_REDIS_READY) keel_redis_close(r, on_closed, x);
}

static void lopen_timeout(lctx *x, const char *url, uint32_t command_timeout_ms) {
  memset(x, 0, sizeof *x);
  x->acq_status = x->rel_status = x->ext_status = 1;
  uv_loop_init(&x->loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.on_state = on_state;
  o.data = x;
  o.command_timeout_ms = command_timeout_ms;
  cr_assert_eq(keel_redis_new(&x->loop, &o, &x->r), 0);
}

static void lopen(lctx *x, const char *url) {
  memset(x, 0, sizeof *x);
  x->acq_status = x->rel_status = x->ext_status = 1;
  uv_loop_init(&x->loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.on_state = on_state;
  o.data = x;
  cr_assert_eq(keel_redis_new(&x->loop, &o, &x->r), 0);
}

static void lopen_shared(lctx *x) {
  char url[128];
  shared_url(url, sizeof url);
  lopen(x, url);
}

static void on_released(keel_redis_lock *lock, int status, void *data);

static void on_acquired(keel_redis_lock *lock, int status, void *data) {
  lctx *x = data;
  x->acq_status = status;
  x->acq_calls++;
  x->fence = keel_redis_lock_fence(lock);
  if (status != 0) x->lock = NULL;
  if (x->close_in_acquire) {
    keel_redis_close(x->r, on_closed, x);
    x->rel_status = keel_redis_lock_release(lock, on_released, x);
  }
}

static void on_released(keel_redis_lock *lock, int status, void *data) {
  lctx *x = data;
  x->rel_status = status;
  x->rel_taken = keel_redis_lock_taken_by_other(lock);
  x->lock = NULL;
  if (x->close_in_release) keel_redis_close(x->r, on_closed, x);
}

static void on_extended(keel_redis_lock *lock, int status, void *data) {
  (void)lock;
  lctx *x = data;
  x->ext_status = status;
  if (x->close_in_extend) keel_redis_close(x->r, on_closed, x);
}

static void on_lost(keel_redis_lock *lock, int status, void *data) {
  (void)lock;
  lctx *x = data;
  x->lost_status = status;
  x->lost_calls++;
  uv_update_time(&x->loop);
  x->lost_at = uv_now(&x->loop);
  x->lost_valid_until = keel_redis_lock_valid_until(lock);
  if (x->close_in_lost) keel_redis_close(x->r, on_closed, x);
}

static bool acq_done(void *p) {
  return ((lctx *)p)->acq_status != 1;
}
static bool rel_done(void *p) {
  return ((lctx *)p)->rel_status != 1;
}
static bool ext_done(void *p) {
  return ((lctx *)p)->ext_status != 1;
}
static bool is_closed(void *p) {
  return ((lctx *)p)->closed;
}
static bool lost_seen(void *p) {
  return ((lctx *)p)->lost_calls > 0;
}

static void acquire(lctx *x, const char *name, const keel_redis_lock_opts *o) {
  x->acq_status = 1;
  cr_assert_eq(keel_redis_lock_acquire(x->r, name, o, on_acquired, x, &x->lock), 0);
  cr_assert_eq(x->acq_status, 1, "callback inside acquire");
  cr_assert(kt_wait_for(&x->loop, acq_done, x, 20000));
}

static void release(lctx *x) {
  x->rel_status = 1;
  cr_assert_eq(keel_redis_lock_release(x->lock, on_released, x), 0);
  cr_assert_eq(x->rel_status, 1, "callback inside release");
  cr_assert(kt_wait_for(&x->loop, rel_done, x, 20000));
}

static void lfinish(lctx *x) {
  if (!x->closed) keel_redis_close(x->r, on_closed, x);
  cr_assert(kt_wait_for(&x->loop, is_closed, x, 10000));
  kt_loop_finish(&x->loop);
}

/* A blocking hiredis connection to the shared server (checks only). */
static long long shared_exists(const char *key) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  redisContext *c = redisConnect(host, port);
  cr_assert(c != NULL && c->err == 0);
  redisReply *rep = redisCommand(c, "EXISTS %s", key);
  long long v = rep != NULL ? rep->integer : -1;
  freeReplyObject(rep);
  redisFree(c);
  return v;
}

Test(redis_lock, fence_busy_release_and_next_fence) {
  lctx a, b;
  lopen_shared(&a);
  lopen_shared(&b);
  char name[64];
  kt_unique_name(name, sizeof name, "lk");
  acquire(&a, name, NULL);
  cr_assert_eq(a.acq_status, 0);
  cr_assert_geq(a.fence, 1);
  cr_assert_eq(strlen(keel_redis_lock_token(a.lock)), 32);
  cr_assert_gt(keel_redis_lock_valid_until(a.lock), uv_now(&a.loop));
  acquire(&b, name, NULL);
  cr_assert_eq(b.acq_status, KEEL_EBUSY);
  release(&a);
  cr_assert_eq(a.rel_status, 0);
  acquire(&b, name, NULL);
  cr_assert_eq(b.acq_status, 0);
  cr_assert_eq(b.fence, a.fence + 1);
  release(&b);
  cr_assert_eq(b.rel_status, 0);
  lfinish(&a);
  lfinish(&b);
}

Test(redis_lock, release_after_expiry_and_after_takeover) {
  lctx a, b;
  lopen_shared(&a);
  lopen_shared(&b);
  char name[64], key[96];
  kt_unique_name(name, sizeof name, "lx");
  snprintf(key, sizeof key, "keel:lock:{%s}", name);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 50;
  acquire(&a, name, &o);
  cr_assert_eq(a.acq_status, 0);
  uv_sleep(120);
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST);
  cr_assert(!a.rel_taken);
  /* expired, then taken by b: a's release must not delete b's key */
  acquire(&a, name, &o);
  cr_assert_eq(a.acq_status, 0);
  uv_sleep(120);
  o.ttl_ms = 10000;
  acquire(&b, name, &o);
  cr_assert_eq(b.acq_status, 0);
  cr_assert_eq(b.fence, a.fence + 1);
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST);
  cr_assert(a.rel_taken);
  cr_assert_eq(shared_exists(key), 1);
  release(&b);
  cr_assert_eq(b.rel_status, 0);
  cr_assert_eq(shared_exists(key), 0);
  lfinish(&a);
  lfinish(&b);
}

Test(redis_lock, extend_moves_validity_and_fails_when_lost) {
  lctx a;
  lopen_shared(&a);
  char name[64];
  kt_unique_name(name, sizeof name, "le");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 200;
  acquire(&a, name, &o);
  uint64_t v0 = keel_redis_lock_valid_until(a.lock);
  uv_sleep(20);
  uv_update_time(&a.loop);
  cr_assert_eq(keel_redis_lock_extend(a.lock, 5000, on_extended, &a), 0);
  cr_assert_eq(keel_redis_lock_release(a.lock, on_released, &a), UV_EINVAL, "extend in progress");
  cr_assert(kt_wait_for(&a.loop, ext_done, &a, 5000));
  cr_assert_eq(a.ext_status, 0);
  cr_assert_gt(keel_redis_lock_valid_until(a.lock), v0 + 4000);
  /* delete the key behind keel's back: the next extend reports lost */
  char key[96];
  snprintf(key, sizeof key, "keel:lock:{%s}", name);
  const char *argv[] = {"DEL", key};
  cr_assert_eq(keel_redis_command(a.r, 2, argv, NULL, NULL, NULL), 0);
  a.ext_status = 1;
  cr_assert_eq(keel_redis_lock_extend(a.lock, 0, on_extended, &a), 0);
  cr_assert(kt_wait_for(&a.loop, ext_done, &a, 5000));
  cr_assert_eq(a.ext_status, KEEL_ELOST);
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST);
  lfinish(&a);
}

static bool never(void *p) {
  (void)p;
  return false;
}

Test(redis_lock, watchdog_keeps_a_live_holder_for_ten_ttls) {
  lctx a, b;
  lopen_shared(&a);
  lopen_shared(&b);
  char name[64];
  kt_unique_name(name, sizeof name, "lw");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 150;
  o.watchdog = true;
  o.on_lost = on_lost;
  o.lost_data = &a;
  acquire(&a, name, &o);
  cr_assert_eq(a.acq_status, 0);
  /* b's loop idles while a's runs: run a's loop for 10 x ttl, with a user
   * extend in the middle (it may supersede a renewal: the watchdog goes on) */
  kt_wait_for(&a.loop, never, NULL, 5 * 150);
  uint64_t before = keel_redis_lock_renewals(a.lock);
  cr_assert_eq(keel_redis_lock_extend(a.lock, 0, on_extended, &a), 0);
  cr_assert(kt_wait_for(&a.loop, ext_done, &a, 5000));
  cr_assert_eq(a.ext_status, 0);
  kt_wait_for(&a.loop, never, NULL, 5 * 150);
  cr_assert_gt(keel_redis_lock_renewals(a.lock), before + 3);
  acquire(&b, name, NULL);
  cr_assert_eq(b.acq_status, KEEL_EBUSY);
  cr_assert_geq(keel_redis_lock_renewals(a.lock), 15, "%llu",
                (unsigned long long)keel_redis_lock_renewals(a.lock));
  cr_assert_eq(a.lost_calls, 0);
  release(&a);
  cr_assert_eq(a.rel_status, 0);
  lfinish(&a);
  lfinish(&b);
}

Test(redis_lock, watchdog_reports_lost_once_and_stops) {
  lctx a;
  lopen_shared(&a);
  char name[64], key[96];
  kt_unique_name(name, sizeof name, "lwl");
  snprintf(key, sizeof key, "keel:lock:{%s}", name);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 90;
  o.watchdog = true;
  o.on_lost = on_lost;
  o.lost_data = &a;
  acquire(&a, name, &o);
  const char *argv[] = {"SET", key, "someone-else"};
  cr_assert_eq(keel_redis_command(a.r, 3, argv, NULL, NULL, NULL), 0);
  cr_assert(kt_wait_for(&a.loop, lost_seen, &a, 5000));
  kt_wait_for(&a.loop, never, NULL, 300);
  cr_assert_eq(a.lost_calls, 1);
  cr_assert_eq(a.lost_status, KEEL_ELOST);
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST);
  cr_assert(a.rel_taken);
  cr_assert_eq(shared_exists(key), 1);
  lfinish(&a);
}

/* R1: with the server stopped, the renewal waited the client's command
 * timeout (longer than the ttl) and on_lost came long after the validity
 * end; it must come no later than that (here: far before the renewal's
 * 10 s timeout), and the renewal's late answer must not revive the lock. */
Test(redis_lock, watchdog_reports_lost_by_the_validity_end_when_the_server_stalls) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  lctx a;
  lopen_timeout(&a, s.url, 10000);
  char name[64];
  kt_unique_name(name, sizeof name, "lws");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 600;
  o.watchdog = true;
  o.on_lost = on_lost;
  o.lost_data = &a;
  acquire(&a, name, &o);
  cr_assert_eq(a.acq_status, 0);
  kill(s.pid, SIGSTOP);
  cr_assert(kt_wait_for(&a.loop, lost_seen, &a, 20000));
  uint64_t renewals = keel_redis_lock_renewals(a.lock);
  cr_assert_eq(a.lost_status, UV_ETIMEDOUT, "%s", keel_err_name(a.lost_status));
  /* timers fire at or after their due time: allow the loop some slack,
   * far less than the 10 s the renewal would wait */
  cr_assert_leq(a.lost_at, a.lost_valid_until + 2000, "on_lost %llu ms after the validity end",
                (unsigned long long)(a.lost_at - a.lost_valid_until));
  kill(s.pid, SIGCONT);
  kt_wait_for(&a.loop, never, NULL, 800); /* the late answer arrives */
  cr_assert_eq(a.lost_calls, 1);
  cr_assert_eq(keel_redis_lock_valid_until(a.lock), a.lost_valid_until, "revived");
  cr_assert_eq(keel_redis_lock_renewals(a.lock), renewals, "revived");
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST, "%s", keel_err_name(a.rel_status));
  lfinish(&a);
  kt_redis_server_destroy(&s);
}

/* R3: cancel after close began returned 0; it must say KEEL_ECLOSING and
 * the acquire's callback still runs once (UV_ECANCELED, from the close). */
Test(redis_lock, cancel_after_close_began_is_eclosing) {
  lctx a;
  lopen_shared(&a);
  char name[64];
  kt_unique_name(name, sizeof name, "lcc");
  cr_assert_eq(keel_redis_lock_acquire(a.r, name, NULL, on_acquired, &a, &a.lock), 0);
  keel_redis_lock *l = a.lock;
  keel_redis_close(a.r, on_closed, &a);
  cr_assert_eq(keel_redis_lock_cancel(l), KEEL_ECLOSING);
  cr_assert_eq(a.acq_calls, 0, "callback inside cancel/close");
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  cr_assert_eq(a.acq_calls, 1);
  cr_assert_eq(a.acq_status, UV_ECANCELED, "%s", keel_err_name(a.acq_status));
  kt_loop_finish(&a.loop);
}

Test(redis_lock, watchdog_cap_lets_it_expire) {
  lctx a;
  lopen_shared(&a);
  char name[64];
  kt_unique_name(name, sizeof name, "lwc");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 60;
  o.watchdog = true;
  o.max_renewals = 2;
  acquire(&a, name, &o);
  kt_wait_for(&a.loop, never, NULL, 400);
  cr_assert_eq(keel_redis_lock_renewals(a.lock), 2);
  release(&a);
  cr_assert_eq(a.rel_status, KEEL_ELOST);
  lfinish(&a);
}

Test(redis_lock, wait_gets_it_after_the_holder_releases) {
  lctx a, b;
  lopen_shared(&a);
  lopen_shared(&b);
  char name[64];
  kt_unique_name(name, sizeof name, "lq");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 300;
  acquire(&a, name, &o); /* never released: expires */
  o.wait_ms = 3000;
  acquire(&b, name, &o);
  cr_assert_eq(b.acq_status, 0);
  cr_assert_eq(b.fence, a.fence + 1);
  release(&b);
  lfinish(&a);
  lfinish(&b);
}

Test(redis_lock, cancel_a_waiting_acquire) {
  lctx a, b;
  lopen_shared(&a);
  lopen_shared(&b);
  char name[64];
  kt_unique_name(name, sizeof name, "lc");
  acquire(&a, name, NULL);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.wait_ms = 10000;
  cr_assert_eq(keel_redis_lock_acquire(b.r, name, &o, on_acquired, &b, &b.lock), 0);
  kt_wait_for(&b.loop, never, NULL, 100);
  cr_assert_eq(keel_redis_lock_cancel(b.lock), 0);
  cr_assert_eq(b.acq_status, 1);
  cr_assert(kt_wait_for(&b.loop, acq_done, &b, 5000));
  cr_assert_eq(b.acq_status, UV_ECANCELED);
  release(&a);
  cr_assert_eq(a.rel_status, 0);
  lfinish(&a);
  lfinish(&b);
}

Test(redis_lock, refusals) {
  lctx a;
  lopen_shared(&a);
  keel_redis_lock *l = (keel_redis_lock *)&a; /* never written */
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  cr_assert_eq(keel_redis_lock_acquire(NULL, "n", NULL, on_acquired, &a, &l), UV_EINVAL);
  cr_assert_eq(keel_redis_lock_acquire(a.r, "", NULL, on_acquired, &a, &l), UV_EINVAL);
  cr_assert_eq(keel_redis_lock_acquire(a.r, "n", NULL, NULL, &a, &l), UV_EINVAL);
  o.ttl_ms = 5;
  cr_assert_eq(keel_redis_lock_acquire(a.r, "n", &o, on_acquired, &a, &l), UV_EINVAL);
  char big[1100];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  cr_assert_eq(keel_redis_lock_acquire(a.r, big, NULL, on_acquired, &a, &l), UV_EINVAL);
  cr_assert_eq(l, (keel_redis_lock *)&a);
  cr_assert_eq(keel_redis_lock_release(NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_redis_lock_extend(NULL, 0, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_redis_lock_cancel(NULL), UV_EINVAL);
  cr_assert_eq(keel_redis_lock_fence(NULL), 0);
  cr_assert_str_eq(keel_redis_lock_token(NULL), "");
  keel_redis *servers[2] = {a.r, NULL};
  cr_assert_eq(keel_redis_redlock_acquire(servers, 2, "n", NULL, on_acquired, &a, &l), UV_EINVAL);
  cr_assert_eq(keel_redis_redlock_acquire(servers, 0, "n", NULL, on_acquired, &a, &l), UV_EINVAL);
  keel_redis_close(a.r, on_closed, &a);
  cr_assert_eq(keel_redis_lock_acquire(a.r, "n", NULL, on_acquired, &a, &l), KEEL_ECLOSING);
  lfinish(&a);
}

/* ---- close from inside every callback ---------------------------------- */

Test(redis_lock, close_inside_acquire_callback) {
  lctx a;
  lopen_shared(&a);
  a.close_in_acquire = true;
  char name[64];
  kt_unique_name(name, sizeof name, "lci");
  acquire(&a, name, NULL);
  cr_assert_eq(a.acq_status, 0);
  cr_assert_eq(a.rel_status, KEEL_ECLOSING);
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  kt_loop_finish(&a.loop);
}

Test(redis_lock, close_inside_release_extend_lost_and_state_callbacks) {
  char name[64];
  lctx a;
  /* release */
  lopen_shared(&a);
  kt_unique_name(name, sizeof name, "lcr");
  a.close_in_release = true;
  acquire(&a, name, NULL);
  release(&a);
  cr_assert_eq(a.rel_status, 0);
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  kt_loop_finish(&a.loop);
  /* extend: the lock is dropped with the client */
  lopen_shared(&a);
  kt_unique_name(name, sizeof name, "lce");
  a.close_in_extend = true;
  acquire(&a, name, NULL);
  cr_assert_eq(keel_redis_lock_extend(a.lock, 0, on_extended, &a), 0);
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  cr_assert_eq(a.ext_status, 0);
  kt_loop_finish(&a.loop);
  /* on_lost */
  lopen_shared(&a);
  kt_unique_name(name, sizeof name, "lcl");
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 60;
  o.watchdog = true;
  o.on_lost = on_lost;
  o.lost_data = &a;
  a.close_in_lost = true;
  acquire(&a, name, &o);
  char key[96];
  snprintf(key, sizeof key, "keel:lock:{%s}", name);
  const char *argv[] = {"DEL", key};
  cr_assert_eq(keel_redis_command(a.r, 2, argv, NULL, NULL, NULL), 0);
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  cr_assert_eq(a.lost_calls, 1);
  kt_loop_finish(&a.loop);
  /* state: close in READY with an acquire pending */
  lopen_shared(&a);
  kt_unique_name(name, sizeof name, "lcs");
  a.close_in_state = true;
  cr_assert_eq(keel_redis_lock_acquire(a.r, name, NULL, on_acquired, &a, &a.lock), 0);
  cr_assert(kt_wait_for(&a.loop, is_closed, &a, 5000));
  cr_assert_eq(a.acq_status, UV_ECANCELED);
  kt_loop_finish(&a.loop);
}

/* ---- allocation failure -------------------------------------------------- */

typedef struct fm {
  uv_loop_t loop;
  keel_redis *r;
  keel_redis_lock *lock;
  int acq, rel, closed;
} fm;

static void fm_closed(void *o, void *d) {
  (void)o;
  ((fm *)d)->closed++;
}
static void fm_released(keel_redis_lock *l, int status, void *d) {
  (void)l;
  fm *f = d;
  f->rel++;
  (void)status;
  keel_redis_close(f->r, fm_closed, f);
}
static void fm_acquired(keel_redis_lock *l, int status, void *d) {
  fm *f = d;
  f->acq++;
  if (status == 0 && keel_redis_lock_release(l, fm_released, f) == 0) return;
  keel_redis_close(f->r, fm_closed, f);
}
static bool fm_done(void *p) {
  return ((fm *)p)->closed > 0;
}

static void fm_scenario(void *arg) {
  const char *name = arg;
  fm f;
  memset(&f, 0, sizeof f);
  uv_loop_init(&f.loop);
  char url[128];
  shared_url(url, sizeof url);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  int rc = keel_redis_new(&f.loop, &o, &f.r);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    kt_loop_finish(&f.loop);
    return;
  }
  rc = keel_redis_lock_acquire(f.r, name, NULL, fm_acquired, &f, &f.lock);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    keel_redis_close(f.r, fm_closed, &f);
  }
  cr_assert(kt_wait_for(&f.loop, fm_done, &f, 5000));
  cr_assert_eq(f.closed, 1);
  cr_assert_leq(f.acq, 1);
  cr_assert_leq(f.rel, 1);
  kt_loop_finish(&f.loop);
}

Test(redis_lock, allocation_failure) {
  char name[64];
  kt_unique_name(name, sizeof name, "lfm");
  kt_failmalloc_run(fm_scenario, name);
}
