/* Faults with real processes and our own redis-server instances: a
 * command timeout (DEBUG SLEEP), a server restart and SCRIPT FLUSH mid-run,
 * a lock holder killed with SIGKILL or stopped past its ttl (fenced
 * PostgreSQL write), many processes on one lock guarding a non-atomic
 * read-modify-write in PostgreSQL, and Redlock with servers stopped. */
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

#define MAXR 64

typedef struct fx {
  uv_loop_t loop;
  keel_redis *r;
  int replies;
  int status[MAXR];
  long long ival[MAXR];
  int downs, readys;
  int acq; /* 1: pending */
  int rel; /* 1: pending */
  bool rel_taken;
  uint64_t fence;
  keel_redis_lock *lock;
  bool closed;
} fx;

static void on_state(keel_redis *r, keel_redis_state st, int status, void *data) {
  (void)r;
  (void)status;
  fx *x = data;
  if (st == KEEL_REDIS_DOWN) x->downs++;
  if (st == KEEL_REDIS_READY) x->readys++;
}

static void on_closed(void *o, void *d) {
  (void)o;
  ((fx *)d)->closed = true;
}

static void store(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  fx *x = data;
  int i = x->replies++;
  if (i >= MAXR) return;
  x->status[i] = status;
  x->ival[i] = keel_redis_reply_integer(rep);
}

static void on_acq(keel_redis_lock *l, int status, void *d) {
  fx *x = d;
  x->acq = status;
  x->fence = keel_redis_lock_fence(l);
  x->lock = status == 0 ? l : NULL;
}

static void on_rel(keel_redis_lock *l, int status, void *d) {
  fx *x = d;
  x->rel = status;
  x->rel_taken = keel_redis_lock_taken_by_other(l);
  x->lock = NULL;
}

static int want;
static bool got_want(void *p) {
  return ((fx *)p)->replies >= want;
}
static bool acq_done(void *p) {
  return ((fx *)p)->acq != 1;
}
static bool rel_done(void *p) {
  return ((fx *)p)->rel != 1;
}
static bool is_closed(void *p) {
  return ((fx *)p)->closed;
}
static bool never(void *p) {
  (void)p;
  return false;
}

static void fopen_url(fx *x, const char *url) {
  memset(x, 0, sizeof *x);
  uv_loop_init(&x->loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.on_state = on_state;
  o.data = x;
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  cr_assert_eq(keel_redis_new(&x->loop, &o, &x->r), 0);
}

static void fclose_all(fx *x) {
  if (!x->closed) keel_redis_close(x->r, on_closed, x);
  cr_assert(kt_wait_for(&x->loop, is_closed, x, 10000));
  kt_loop_finish(&x->loop);
}

static void sendc(fx *x, uint64_t timeout, const char *a0, const char *a1, const char *a2) {
  const char *argv[3] = {a0, a1, a2};
  int argc = a2 ? 3 : a1 ? 2 : 1;
  cr_assert_eq(keel_redis_command_timeout(x->r, timeout, argc, argv, NULL, store, x), 0);
}

static void wait_n(fx *x, int n) {
  want = n;
  cr_assert(kt_wait_for(&x->loop, got_want, x, 20000), "%d of %d replies", x->replies, n);
}

static void lock_acquire(fx *x, const char *name, const keel_redis_lock_opts *o) {
  x->acq = 1;
  cr_assert_eq(keel_redis_lock_acquire(x->r, name, o, on_acq, x, &x->lock), 0);
  cr_assert(kt_wait_for(&x->loop, acq_done, x, 30000));
}

static void lock_release(fx *x) {
  x->rel = 1;
  cr_assert_eq(keel_redis_lock_release(x->lock, on_rel, x), 0);
  cr_assert(kt_wait_for(&x->loop, rel_done, x, 30000));
}

/* ---- timeouts, restarts, SCRIPT FLUSH ------------------------------------ */

Test(redis_faults, debug_sleep_times_out_and_resets) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  fx x;
  fopen_url(&x, s.url);
  sendc(&x, 0, "PING", NULL, NULL);
  wait_n(&x, 1);
  cr_assert_eq(x.status[0], 0);
  sendc(&x, 500, "DEBUG", "SLEEP", "2");
  sendc(&x, 5000, "PING", NULL, NULL); /* behind it, in flight when it is reset */
  wait_n(&x, 3);
  cr_assert_eq(x.status[1], UV_ETIMEDOUT);
  cr_assert_eq(x.status[2], KEEL_EINDOUBT);
  /* the next command waits for the reconnect and the server's wake-up */
  sendc(&x, 5000, "INCR", "after", NULL);
  wait_n(&x, 4);
  cr_assert_eq(x.status[3], 0);
  cr_assert_eq(x.ival[3], 1);
  keel_redis_stats st;
  keel_redis_get_stats(x.r, &st);
  cr_assert_eq(st.timeouts, 1);
  cr_assert_eq(st.in_doubt, 1);
  cr_assert_eq(st.disconnects, 1);
  cr_assert_geq(st.reconnects, 1);
  cr_assert_eq(st.pending, 0);
  cr_assert_geq(x.downs, 1);
  fclose_all(&x);
  kt_redis_server_destroy(&s);
}

Test(redis_faults, restart_mid_run_next_command_succeeds) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  fx x;
  fopen_url(&x, s.url);
  sendc(&x, 0, "INCR", "k", NULL);
  wait_n(&x, 1);
  cr_assert_eq(x.ival[0], 1);
  kt_redis_server_stop(&s);
  kt_wait_for(&x.loop, never, NULL, 200);
  cr_assert_geq(x.downs, 1);
  sendc(&x, 10000, "INCR", "k", NULL); /* waits while down */
  kt_redis_server_restart(&s);
  wait_n(&x, 2);
  cr_assert_eq(x.status[1], 0);
  cr_assert_eq(x.ival[1], 1); /* a fresh server (no persistence) */
  cr_assert_geq(x.readys, 2);
  fclose_all(&x);
  kt_redis_server_destroy(&s);
}

Test(redis_faults, lock_after_script_flush_and_restart) {
  kt_redis_server s;
  kt_redis_server_start(&s);
  fx x;
  fopen_url(&x, s.url);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.wait_ms = 5000;
  lock_acquire(&x, "slot", &o);
  cr_assert_eq(x.acq, 0);
  cr_assert_eq(x.fence, 1);
  lock_release(&x);
  cr_assert_eq(x.rel, 0);
  cr_assert_neq(kt_redis_server_cmd(&s, "SCRIPT FLUSH"), -1);
  lock_acquire(&x, "slot", &o);
  cr_assert_eq(x.acq, 0, "%s", keel_err_name(x.acq));
  cr_assert_eq(x.fence, 2);
  lock_release(&x);
  cr_assert_eq(x.rel, 0);
  kt_redis_server_stop(&s);
  kt_redis_server_restart(&s);
  lock_acquire(&x, "slot", &o);
  cr_assert_eq(x.acq, 0, "%s", keel_err_name(x.acq));
  cr_assert_eq(x.fence, 1); /* the restarted server lost its counter: see docs */
  lock_release(&x);
  cr_assert_eq(x.rel, 0);
  keel_redis_stats st;
  keel_redis_get_stats(x.r, &st);
  cr_assert_geq(st.noscript, 2);
  fclose_all(&x);
  kt_redis_server_destroy(&s);
}

/* ---- real processes --------------------------------------------------------- */

/* Child: takes `name` on the shared server with ttl, writes "<fence>\n";
 * with go_fd >= 0 waits for a byte on it, releases, writes
 * "<release status> <taken>\n", then runs the fenced write with its fence
 * and writes "<rows>\n". Without go_fd it sleeps until killed. */
static void child_holder(const char *name, uint64_t ttl, int out_fd, int go_fd, const char *table) {
  fx x;
  char url[128];
  kt_redis_url(url, sizeof url);
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  if (keel_redis_new(&x.loop, &o, &x.r) != 0) _exit(91);
  keel_redis_lock_opts lo;
  keel_redis_lock_opts_init(&lo);
  lo.ttl_ms = ttl;
  x.acq = 1;
  if (keel_redis_lock_acquire(x.r, name, &lo, on_acq, &x, &x.lock) != 0) _exit(92);
  while (x.acq == 1) uv_run(&x.loop, UV_RUN_ONCE);
  if (x.acq != 0) _exit(93);
  char line[64];
  snprintf(line, sizeof line, "%llu\n", (unsigned long long)x.fence);
  kt_pipe_write(out_fd, line);
  if (go_fd < 0) {
    for (;;) pause();
  }
  char b;
  if (read(go_fd, &b, 1) != 1) _exit(94);
  uv_update_time(&x.loop);
  x.rel = 1;
  if (keel_redis_lock_release(x.lock, on_rel, &x) != 0) _exit(95);
  while (x.rel == 1) uv_run(&x.loop, UV_RUN_ONCE);
  snprintf(line, sizeof line, "%d %d\n", x.rel, x.rel_taken ? 1 : 0);
  kt_pipe_write(out_fd, line);
  PGconn *pg = PQconnectdb(kt_pg_conninfo());
  char sql[256];
  snprintf(sql, sizeof sql,
           "UPDATE %s SET owner = 'first', fence = %llu WHERE id = 1 AND fence < %llu", table,
           (unsigned long long)x.fence, (unsigned long long)x.fence);
  PGresult *res = PQexec(pg, sql);
  snprintf(line, sizeof line, "%s\n",
           PQresultStatus(res) == PGRES_COMMAND_OK ? PQcmdTuples(res) : "error");
  PQclear(res);
  PQfinish(pg);
  kt_pipe_write(out_fd, line);
  keel_redis_close(x.r, NULL, NULL);
  uv_run(&x.loop, UV_RUN_DEFAULT);
  _exit(0);
}

Test(redis_faults, holder_killed_another_acquires_within_ttl_and_a_retry) {
  char name[64];
  kt_unique_name(name, sizeof name, "fk");
  int p[2];
  cr_assert_eq(pipe(p), 0);
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    close(p[0]);
    child_holder(name, 500, p[1], -1, NULL);
  }
  close(p[1]);
  char line[64];
  kt_pipe_read_line(p[0], line, sizeof line);
  unsigned long long f = strtoull(line, NULL, 10);
  cr_assert_geq(f, 1);
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  close(p[0]);
  fx x;
  char url[128];
  kt_redis_url(url, sizeof url);
  fopen_url(&x, url);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  /* the bound: the dead holder's ttl plus one retry delay (cap 200 ms) */
  o.wait_ms = 500 + 200;
  lock_acquire(&x, name, &o);
  cr_assert_eq(x.acq, 0, "%s", keel_err_name(x.acq));
  cr_assert_eq(x.fence, f + 1);
  lock_release(&x);
  cr_assert_eq(x.rel, 0);
  fclose_all(&x);
}

Test(redis_faults, holder_stopped_past_ttl_is_fenced_out) {
  char name[64], table[64];
  kt_unique_name(name, sizeof name, "fs");
  kt_unique_name(table, sizeof table, "fs_slot");
  kt_pg_execf("CREATE TABLE %s (id int PRIMARY KEY, owner text, fence bigint NOT NULL)", table);
  kt_pg_execf("INSERT INTO %s VALUES (1, NULL, 0)", table);
  int out[2], go[2];
  cr_assert_eq(pipe(out), 0);
  cr_assert_eq(pipe(go), 0);
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    close(out[0]);
    close(go[1]);
    child_holder(name, 300, out[1], go[0], table);
  }
  close(out[1]);
  close(go[0]);
  char line[64];
  kt_pipe_read_line(out[0], line, sizeof line);
  unsigned long long f = strtoull(line, NULL, 10);
  kill(pid, SIGSTOP);
  usleep(450 * 1000); /* past the ttl */
  fx x;
  char url[128];
  kt_redis_url(url, sizeof url);
  fopen_url(&x, url);
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.wait_ms = 2000;
  lock_acquire(&x, name, &o);
  cr_assert_eq(x.acq, 0);
  cr_assert_eq(x.fence, f + 1);
  char *rows = kt_pg_scalarf(
      "WITH u AS (UPDATE %s SET owner = 'second', fence = %llu WHERE id = 1 AND fence < %llu "
      "RETURNING 1) SELECT count(*) FROM u",
      table, f + 1, f + 1);
  cr_assert_str_eq(rows, "1");
  free(rows);
  kill(pid, SIGCONT);
  cr_assert_eq(write(go[1], "g", 1), 1);
  kt_pipe_read_line(out[0], line, sizeof line);
  int rel = 0, taken = 0;
  cr_assert_eq(sscanf(line, "%d %d", &rel, &taken), 2);
  cr_assert_eq(rel, KEEL_ELOST, "%s", keel_err_name(rel));
  cr_assert_eq(taken, 1);
  kt_pipe_read_line(out[0], line, sizeof line);
  cr_assert_str_eq(line, "0", "the stale holder's fenced write updated %s rows", line);
  int wst = 0;
  waitpid(pid, &wst, 0);
  cr_assert(WIFEXITED(wst) && WEXITSTATUS(wst) == 0, "child status %d", wst);
  char *owner = kt_pg_scalarf("SELECT owner || ':' || fence FROM %s WHERE id = 1", table);
  char expect[64];
  snprintf(expect, sizeof expect, "second:%llu", f + 1);
  cr_assert_str_eq(owner, expect);
  free(owner);
  /* the second's lock is still there: its release deletes it */
  lock_release(&x);
  cr_assert_eq(x.rel, 0);
  fclose_all(&x);
  close(out[0]);
  close(go[1]);
  kt_pg_execf("DROP TABLE %s", table);
}

/* ---- Redlock ------------------------------------------------------------------ */

typedef struct rl {
  uv_loop_t loop;
  keel_redis *r[3];
  int closed;
  int acq, rel;
  uint64_t fence;
  keel_redis_lock *lock;
} rl;

static void rl_closed(void *o, void *d) {
  (void)o;
  ((rl *)d)->closed++;
}
static void rl_acq(keel_redis_lock *l, int status, void *d) {
  rl *x = d;
  x->acq = status;
  x->fence = keel_redis_lock_fence(l);
  x->lock = status == 0 ? l : NULL;
}
static void rl_rel(keel_redis_lock *l, int status, void *d) {
  (void)l;
  ((rl *)d)->rel = status;
}
static bool rl_acq_done(void *p) {
  return ((rl *)p)->acq != 1;
}
static bool rl_rel_done(void *p) {
  return ((rl *)p)->rel != 1;
}
static bool rl_all_closed(void *p) {
  return ((rl *)p)->closed == 3;
}

static int redlock_try(rl *x, const char *name) {
  keel_redis_lock_opts o;
  keel_redis_lock_opts_init(&o);
  o.ttl_ms = 2000;
  x->acq = 1;
  cr_assert_eq(keel_redis_redlock_acquire(x->r, 3, name, &o, rl_acq, x, &x->lock), 0);
  cr_assert(kt_wait_for(&x->loop, rl_acq_done, x, 10000));
  if (x->acq == 0) {
    cr_assert_gt(keel_redis_lock_valid_until(x->lock), uv_now(&x->loop));
    x->rel = 1;
    cr_assert_eq(keel_redis_lock_release(x->lock, rl_rel, x), 0);
    cr_assert(kt_wait_for(&x->loop, rl_rel_done, x, 10000));
  }
  return x->acq;
}

Test(redis_faults, redlock_one_down_granted_two_down_refused) {
  kt_redis_server s[3];
  rl x;
  memset(&x, 0, sizeof x);
  uv_loop_init(&x.loop);
  for (int i = 0; i < 3; i++) {
    kt_redis_server_start(&s[i]);
    keel_redis_opts o;
    keel_redis_opts_init(&o);
    o.url = s[i].url;
    keel_backoff_fixed(&o.reconnect_backoff, 20);
    cr_assert_eq(keel_redis_new(&x.loop, &o, &x.r[i]), 0);
  }
  uv_update_time(&x.loop); /* the servers took a while to start */
  cr_assert_eq(redlock_try(&x, "room"), 0, "%s", keel_err_name(x.acq));
  cr_assert_eq(x.rel, 0);
  cr_assert_eq(x.fence, 1);
  kt_redis_server_stop(&s[2]);
  uv_update_time(&x.loop);
  cr_assert_eq(redlock_try(&x, "room"), 0, "one server down: %s", keel_err_name(x.acq));
  cr_assert_eq(x.rel, 0);
  cr_assert_eq(x.fence, 2);
  kt_redis_server_stop(&s[1]);
  uv_update_time(&x.loop);
  int st = redlock_try(&x, "room");
  cr_assert_neq(st, 0, "two servers down: still granted");
  cr_assert(st == UV_ETIMEDOUT || st == KEEL_ECONN || st == KEEL_EINDOUBT || st == KEEL_EBUSY, "%s",
            keel_err_name(st));
  /* the refused attempt left nothing behind on the live server */
  kt_wait_for(&x.loop, never, NULL, 100);
  cr_assert_eq(kt_redis_server_cmd(&s[0], "EXISTS keel:lock:{room}"), 0);
  /* held by someone else on a majority: KEEL_EBUSY */
  kt_redis_server_restart(&s[1]);
  kt_redis_server_restart(&s[2]);
  kt_wait_for(&x.loop, never, NULL, 300);
  for (int i = 0; i < 2; i++)
    cr_assert_neq(kt_redis_server_cmd(&s[i], "SET keel:lock:{room} other PX 5000"), -1);
  cr_assert_eq(redlock_try(&x, "room"), KEEL_EBUSY);
  for (int i = 0; i < 3; i++) keel_redis_close(x.r[i], rl_closed, &x);
  cr_assert(kt_wait_for(&x.loop, rl_all_closed, &x, 10000));
  kt_loop_finish(&x.loop);
  for (int i = 0; i < 3; i++) kt_redis_server_destroy(&s[i]);
}
