/* Verifier under faults, against a real PostgreSQL: a database that cannot be
 * reached, a run stuck behind a lock (run_timeout_ms), the verifier's own
 * backend killed mid-run; the bound on fix-ups waiting for a retry and the
 * order of retries; the callback contract (no callback inside the call that
 * caused it, close from inside every callback, KEEL_ECLOSING after close,
 * UV_ECANCELED for a dropped run); every allocation failing in turn. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keel/verify.h"
#include "support/harness.h"

/* ---- helpers ---------------------------------------------------------------- */

typedef struct fx {
  uv_loop_t loop;
  char table[96];
  keel_verify *v;
  keel_verify_opts o;
  int runs_done;
  int last_status;
  int runs_done_at_close; /* on_run_done calls seen by the close callback */
  bool closed;
  bool in_call; /* set around keel calls: no callback may run then */
  int callbacks_inside;
  int nseen;
  long seen[1024];
  int fix_calls;
  int fail_attempts; /* attempts that fail per row (fix_done inline) */
  long order1[64], order2[64];
  int n1, n2;
  keel_verify_fix *held;
  bool hold;             /* the fix-up keeps its handle */
  int close_in;          /* 1 validator, 2 fix-up, 3 on_run_done */
  bool kill_backend;     /* the validator kills the verifier's backend */
  uint64_t fix_delay_ms; /* fix-up reports after this */
  int fix_done_rc;       /* last keel_verify_fix_done() return of a delayed report */
  int delayed_out;
} fx;

static void fx_init(fx *f, const char *prefix) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  kt_unique_name(f->table, sizeof f->table, prefix);
  keel_verify_opts_init(&f->o);
  f->o.conninfo = kt_pg_conninfo();
  f->o.table = f->table;
  f->o.data = f;
  f->last_status = 1;
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  fx *f = data;
  if (f->in_call) f->callbacks_inside++;
  f->closed = true;
  f->runs_done_at_close = f->runs_done;
}

static bool is_closed(void *ctx) {
  return ((fx *)ctx)->closed;
}

static bool one_run(void *ctx) {
  return ((fx *)ctx)->runs_done >= 1;
}

static bool two_runs(void *ctx) {
  return ((fx *)ctx)->runs_done >= 2;
}

static bool delayed_none(void *ctx) {
  return ((fx *)ctx)->delayed_out == 0;
}

static void fx_finish(fx *f) {
  if (f->v) {
    keel_verify_close(f->v, on_closed, f);
    cr_expect(kt_wait_for(&f->loop, is_closed, f, 5000), "close callback not called");
    f->v = NULL;
  }
  kt_wait_for(&f->loop, delayed_none, f, 5000);
  kt_loop_finish(&f->loop);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", f->table);
}

static keel_verify_stats stats(const fx *f) {
  keel_verify_stats st;
  keel_verify_get_stats(f->v, &st);
  return st;
}

static long row_id(const keel_verify_row *row) {
  const char *s = keel_verify_row_get(row, "id");
  return s ? strtol(s, NULL, 10) : -1;
}

static void make_ids(const char *table, int n) {
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY, v text)", table);
  kt_pg_execf("INSERT INTO \"%s\" SELECT g, 'x' FROM generate_series(1, %d) g", table, n);
}

static void on_run_done(keel_verify *v, int status, void *data) {
  fx *f = data;
  if (f->in_call) f->callbacks_inside++;
  f->runs_done++;
  f->last_status = status;
  if (f->close_in == 3) keel_verify_close(v, on_closed, f);
}

/* Even ids are invalid. Closes or kills the backend when asked. */
static bool validator(keel_verify *v, const keel_verify_row *row, void *data) {
  fx *f = data;
  if (f->in_call) f->callbacks_inside++;
  long id = row_id(row);
  if (f->nseen < (int)(sizeof f->seen / sizeof f->seen[0])) f->seen[f->nseen] = id;
  f->nseen++;
  if (f->close_in == 1 && f->nseen == 3) keel_verify_close(v, on_closed, f);
  if (f->kill_backend && f->nseen == 1) {
    /* the verifier's own backend only: the one that ran our batch query */
    char *n = kt_pg_scalarf(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> "
        "pg_backend_pid() AND query LIKE '%%%s%%' AND query NOT LIKE '%%pg_terminate%%'",
        f->table);
    cr_expect_str_eq(n, "1", "killed %s backends", n);
    free(n);
  }
  return id % 2 == 1;
}

typedef struct delayed {
  uv_timer_t t;
  keel_verify_fix *fix;
  fx *f;
} delayed;

static void delayed_closed(uv_handle_t *h) {
  delayed *d = h->data;
  d->f->delayed_out--;
  free(d);
}

static void delayed_fire(uv_timer_t *t) {
  delayed *d = t->data;
  d->f->fix_done_rc = keel_verify_fix_done(d->fix, 0);
  uv_close((uv_handle_t *)t, delayed_closed);
}

static void fixup(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row, void *data) {
  fx *f = data;
  if (f->in_call) f->callbacks_inside++;
  f->fix_calls++;
  unsigned attempt = keel_verify_fix_attempt(fix);
  long id = row_id(row);
  if (attempt == 1 && f->n1 < 64) f->order1[f->n1++] = id;
  if (attempt == 2 && f->n2 < 64) f->order2[f->n2++] = id;
  if (f->close_in == 2) {
    keel_verify_close(v, on_closed, f);
    cr_expect_eq(keel_verify_fix_done(fix, 0), KEEL_ESTALE);
    return;
  }
  if (f->hold) {
    f->held = fix;
    return;
  }
  if (f->fix_delay_ms > 0) {
    delayed *d = calloc(1, sizeof *d);
    d->fix = fix;
    d->f = f;
    uv_timer_init(&f->loop, &d->t);
    d->t.data = d;
    uv_timer_start(&d->t, delayed_fire, f->fix_delay_ms, 0);
    f->delayed_out++;
    return;
  }
  int status = (int)attempt <= f->fail_attempts ? KEEL_EPG : 0;
  cr_expect_eq(keel_verify_fix_done(fix, status), 0);
}

/* A loopback port nothing listens on. */
static int closed_port(void) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  cr_assert_geq(s, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof a), 0);
  socklen_t len = sizeof a;
  cr_assert_eq(getsockname(s, (struct sockaddr *)&a, &len), 0);
  close(s);
  return ntohs(a.sin_port);
}

/* ---- #9: nothing hangs while the database is down ------------------------------ */

Test(verify_faults, unreachable_database_ends_every_run) {
  fx f;
  fx_init(&f, "vdown");
  char ci[128];
  snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=postgres user=postgres", closed_port());
  f.o.conninfo = ci;
  f.o.validate = validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "no on_run_done while unreachable: %s",
            keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, KEEL_ECONN, "%s", keel_err_name(f.last_status));
  cr_expect(strstr(keel_verify_last_error(f.v), "database unreachable") != NULL, "%s",
            keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_started, 1);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_eq(st.last_status, KEEL_ECONN);
  cr_expect_not(st.running);
  cr_expect(strstr(st.last_error, "database unreachable") != NULL, "%s", st.last_error);
  /* the next run is not blocked by the first one's statement, and ends too */
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, two_runs, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, KEEL_ECONN);
  st = stats(&f);
  cr_expect_eq(st.runs_failed, 2);
  cr_expect_eq(f.nseen, 0);
  fx_finish(&f);
}

Test(verify_faults, leader_lock_unreachable_ends_the_run) {
  fx f;
  fx_init(&f, "vdownlock");
  char ci[128];
  snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d dbname=postgres user=postgres", closed_port());
  f.o.conninfo = ci;
  f.o.leader_lock = true;
  f.o.validate = validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "no on_run_done while unreachable: %s",
            keel_verify_last_error(f.v));
  cr_expect_lt(f.last_status, 0);
  cr_expect(strstr(keel_verify_last_error(f.v), "database unreachable") != NULL, "%s",
            keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_eq(st.runs_started, 1);
  cr_expect_not(st.leader);
  fx_finish(&f);
}

/* A run stuck behind a lock another session holds ends at run_timeout_ms;
 * its batch, answered later, is dropped and the next run is whole. */
Test(verify_faults, run_timeout_bounds_a_stuck_run) {
  fx f;
  fx_init(&f, "vstuck");
  make_ids(f.table, 30);
  PGconn *locker = PQconnectdb(kt_pg_conninfo());
  cr_assert_eq(PQstatus(locker), CONNECTION_OK);
  char sql[256];
  snprintf(sql, sizeof sql, "BEGIN; LOCK TABLE \"%s\" IN ACCESS EXCLUSIVE MODE", f.table);
  PGresult *r = PQexec(locker, sql);
  cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s", PQerrorMessage(locker));
  PQclear(r);
  f.o.validate = validator;
  f.o.on_run_done = on_run_done;
  f.o.run_timeout_ms = 300;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, UV_ETIMEDOUT, "%s", keel_err_name(f.last_status));
  cr_expect(strstr(keel_verify_last_error(f.v), "run timed out after 300 ms") != NULL, "%s",
            keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_timed_out, 1);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_not(st.running);
  /* the lock goes: the stuck statement comes back (dropped), the next run is whole */
  r = PQexec(locker, "COMMIT");
  PQclear(r);
  PQfinish(locker);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, two_runs, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0, "%s", keel_verify_last_error(f.v));
  st = stats(&f);
  cr_expect_eq(st.rows_last_run, 30);
  cr_expect_eq(st.rows_scanned, 30);
  cr_expect_eq(f.nseen, 30);
  fx_finish(&f);
}

/* The verifier's own backend is killed while its fix-ups run: the run ends
 * at once with the connection error (the fix-ups' late reports are stale),
 * and the next run, on a new session, is whole. */
Test(verify_faults, backend_killed_mid_run) {
  KT_SKIP_BEHIND_POOLER("kills the verifier's backend by pid");
  fx f;
  fx_init(&f, "vkill");
  make_ids(f.table, 40);
  f.o.validate = validator;
  f.o.fix = fixup;
  f.o.fix_concurrency = 2;
  f.fix_delay_ms = 3000; /* the run is still going when the loss is seen */
  f.kill_backend = true;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect(f.last_status == KEEL_ECONN || f.last_status == KEEL_EINDOUBT, "%s",
            keel_err_name(f.last_status));
  cr_expect(strstr(keel_verify_last_error(f.v), "database unreachable") != NULL, "%s",
            keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_eq(st.fixes_running, 0);
  cr_expect_eq(st.fixes_pending, 0);
  cr_expect_eq(st.fixes_dropped, 20, "dropped %" PRIu64, st.fixes_dropped);
  /* the fix-ups' late reports are stale */
  cr_assert(kt_wait_for(&f.loop, delayed_none, &f, 10000));
  cr_expect_eq(f.fix_done_rc, KEEL_ESTALE);
  /* next run: new session, whole table */
  f.kill_backend = false;
  f.fix_delay_ms = 0;
  f.nseen = 0;
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, two_runs, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0, "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.nseen, 40);
  st = stats(&f);
  cr_expect_eq(st.rows_last_run, 40);
  fx_finish(&f);
}

/* ---- bounded memory: fix-ups waiting for a retry ------------------------------ */

Test(verify_faults, fix_max_waiting_bounds_the_retry_list) {
  fx f;
  fx_init(&f, "vwaitcap");
  make_ids(f.table, 20); /* 10 invalid rows */
  f.o.validate = validator;
  f.o.fix = fixup;
  f.o.fix_concurrency = 10;
  f.o.fix_max_retries = 3;
  f.o.fix_max_waiting = 2;
  keel_backoff_fixed(&f.o.fix_backoff, 50);
  f.fail_attempts = 100; /* every attempt fails */
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.fixes_dropped, 8, "dropped %" PRIu64, st.fixes_dropped);
  cr_expect_eq(st.fixes_failed, 10);
  cr_expect_eq(st.fixes_attempted, 10 + 2 * 3, "attempted %" PRIu64, st.fixes_attempted);
  cr_expect_eq(st.fixes_pending, 0);
  fx_finish(&f);
}

Test(verify_faults, retries_come_in_due_order) {
  fx f;
  fx_init(&f, "vwaitorder");
  make_ids(f.table, 80); /* 40 invalid rows */
  f.o.validate = validator;
  f.o.fix = fixup;
  f.o.fix_concurrency = 1;
  keel_backoff_fixed(&f.o.fix_backoff, 30);
  f.fail_attempts = 1;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0);
  cr_assert_eq(f.n1, 40);
  cr_assert_eq(f.n2, 40);
  for (int i = 0; i < 40; i++)
    cr_expect_eq(f.order2[i], f.order1[i], "retry %d: row %ld, first tried %ld", i, f.order2[i],
                 f.order1[i]);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.fixes_succeeded, 40);
  cr_expect_eq(st.fixes_dropped, 0);
  fx_finish(&f);
}

/* ---- the callback contract ------------------------------------------------------ */

Test(verify_faults, no_callback_inside_the_call_that_caused_it) {
  fx f;
  fx_init(&f, "vinside");
  make_ids(f.table, 10);
  f.o.validate = validator;
  f.o.fix = fixup;
  f.hold = true;
  f.o.fix_concurrency = 1; /* one handle held at a time */
  f.o.on_run_done = on_run_done;
  f.in_call = true;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_start(f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0); /* before start's first tick */
  f.in_call = false;
  while (f.held == NULL) uv_run(&f.loop, UV_RUN_NOWAIT);
  f.in_call = true;
  cr_assert_eq(keel_verify_stop(f.v), 0);
  keel_verify_fix *held = f.held;
  f.held = NULL;
  cr_assert_eq(keel_verify_fix_done(held, 0), 0);
  f.in_call = false;
  while (f.held == NULL) uv_run(&f.loop, UV_RUN_NOWAIT); /* stop lets the fix-ups finish */
  f.in_call = true;
  keel_verify_close(f.v, on_closed, &f);
  cr_expect_eq(keel_verify_start(f.v), KEEL_ECLOSING);
  cr_expect_eq(keel_verify_run_now(f.v), KEEL_ECLOSING);
  cr_expect_eq(keel_verify_stop(f.v), KEEL_ECLOSING);
  cr_expect_eq(keel_verify_fix_done(f.held, 0), KEEL_ESTALE);
  f.in_call = false;
  cr_assert(kt_wait_for(&f.loop, is_closed, &f, 5000));
  f.v = NULL;
  cr_expect_eq(f.callbacks_inside, 0, "%d callbacks ran inside a keel call", f.callbacks_inside);
  cr_expect_eq(f.runs_done, 1, "the dropped run reports once");
  cr_expect_eq(f.last_status, UV_ECANCELED);
  cr_expect_eq(f.runs_done_at_close, 1, "the run reports before the close callback");
  fx_finish(&f);
}

Test(verify_faults, stop_before_the_run_began_reports_ecanceled) {
  fx f;
  fx_init(&f, "vstopreq");
  make_ids(f.table, 10);
  f.o.validate = validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  f.in_call = true;
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert_eq(keel_verify_stop(f.v), 0);
  f.in_call = false;
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 5000));
  for (int i = 0; i < 5; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_expect_eq(f.runs_done, 1);
  cr_expect_eq(f.last_status, UV_ECANCELED);
  cr_expect_eq(f.nseen, 0);
  cr_expect_eq(f.callbacks_inside, 0);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_started, 1);
  cr_expect_eq(st.runs_failed, 1);
  fx_finish(&f);
}

static void close_from(int where) {
  fx f;
  fx_init(&f, "vclosein");
  make_ids(f.table, 10);
  f.o.validate = validator;
  f.o.fix = fixup;
  f.o.on_run_done = on_run_done;
  f.close_in = where;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, is_closed, &f, 10000), "close from callback %d did not finish",
            where);
  f.v = NULL;
  cr_expect_eq(f.runs_done, 1, "on_run_done exactly once (close in %d)", where);
  cr_expect_eq(f.runs_done_at_close, 1);
  if (where != 3) cr_expect_eq(f.last_status, UV_ECANCELED);
  if (where == 3) cr_expect_eq(f.last_status, 0);
  fx_finish(&f); /* uv_loop_close() == 0 */
}

Test(verify_faults, close_from_the_validator) {
  close_from(1);
}

Test(verify_faults, close_from_the_fixup) {
  close_from(2);
}

Test(verify_faults, close_from_on_run_done) {
  close_from(3);
}

/* ---- allocation failure ---------------------------------------------------------- */

typedef struct oom_ctx {
  const char *table;
  const char *lease; /* with the leader lease in this table, else NULL */
  int runs;
} oom_ctx;

static void oom_scenario(void *arg) {
  oom_ctx *c = arg;
  fx f;
  memset(&f, 0, sizeof f);
  cr_assert_eq(uv_loop_init(&f.loop), 0);
  keel_verify_opts_init(&f.o);
  f.o.conninfo = kt_pg_conninfo();
  f.o.table = c->table;
  f.o.data = &f;
  f.o.batch_size = 4;
  f.o.validate = validator;
  f.o.fix = fixup;
  f.o.on_run_done = on_run_done;
  f.o.run_timeout_ms = 3000;
  f.o.leader_lock = c->lease != NULL;
  f.o.leader_table = c->lease;
  /* a lease whose release failed (an allocation) stays until it expires:
   * each run its own job */
  static int job_seq;
  char job[32];
  snprintf(job, sizeof job, "job%d", job_seq++);
  f.o.job_name = job;
  f.fail_attempts = 1;
  keel_backoff_fixed(&f.o.fix_backoff, 1);
  int rc = keel_verify_new(&f.loop, &f.o, &f.v);
  if (rc != 0) {
    cr_expect_eq(rc, UV_ENOMEM, "new: %s", keel_err_name(rc));
    cr_expect_null(f.v);
    cr_expect_geq(kt_failmalloc_index(), 0);
    kt_loop_finish(&f.loop);
    return;
  }
  rc = keel_verify_run_now(f.v);
  cr_expect_eq(rc, 0);
  kt_wait_for(&f.loop, one_run, &f, 6000);
  cr_expect_eq(f.runs_done, 1, "the run did not end (allocation %" PRId64 ", %s): %s",
               kt_failmalloc_index(), kt_failmalloc_sticky() ? "sticky" : "once",
               keel_verify_last_error(f.v));
  if (kt_failmalloc_index() < 0) {
    cr_expect_eq(f.last_status, 0, "%s", keel_verify_last_error(f.v));
    keel_verify_stats st = stats(&f);
    cr_expect_eq(st.rows_scanned, 10);
    cr_expect_eq(st.fixes_succeeded, 5);
  }
  keel_verify_close(f.v, on_closed, &f);
  cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000), "close hung (allocation %" PRId64 ")",
            kt_failmalloc_index());
  cr_expect_eq(f.runs_done, 1, "on_run_done lost or doubled (allocation %" PRId64 ")",
               kt_failmalloc_index());
  c->runs++;
  kt_loop_finish(&f.loop);
}

Test(verify_faults, every_allocation_failing_in_turn, .timeout = 600) {
  char table[96];
  kt_unique_name(table, sizeof table, "voomrun");
  make_ids(table, 10);
  oom_ctx c = {.table = table};
  kt_failmalloc_run(oom_scenario, &c);
  cr_log_info("%" PRIu64 " allocations, %d runs", kt_failmalloc_count(), c.runs);
  cr_expect_gt(kt_failmalloc_count(), 10);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", table);
}

/* The same with the leader lease: every allocation of the lease's requests,
 * renewals, fenced end of run and release failing in turn. */
Test(verify_faults, every_allocation_failing_in_turn_with_lease, .timeout = 600) {
  char table[96], lease[96];
  kt_unique_name(table, sizeof table, "voomlease");
  kt_unique_name(lease, sizeof lease, "voomlease_tab");
  make_ids(table, 10);
  oom_ctx c = {.table = table, .lease = lease};
  kt_failmalloc_run(oom_scenario, &c);
  cr_expect_gt(c.runs, 0);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", table);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", lease);
}
