/* Verifier against a real PostgreSQL: the seed's orders example end to end,
 * keyset walks over gaps, composite keys and concurrent inserts/deletes, no
 * overlapping runs with a slow fix-up, fix-up failures, retries and
 * timeouts, leader election between two verifiers (close and connection
 * loss), checkpoint resume, stats, close mid-run. */
#include <criterion/criterion.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
  bool closed;
  /* what the validator saw */
  long seen[4096];
  int nseen;
  bool order_ok;
  long max_running_runs;
  /* fix-up behaviour */
  int fail_times;   /* attempts that fail per row */
  long always_fail; /* row id whose fix-up always fails */
  long hang_id;     /* row id whose first attempt never reports */
  keel_verify_fix *hung;
  uint64_t fix_delay_ms;
  int fix_calls;
  keel_pg_pool *pool;
  int fixes_out;
  int max_fixes_out;
} fx;

static void fx_init(fx *f, const char *prefix) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  kt_unique_name(f->table, sizeof f->table, prefix);
  f->order_ok = true;
  f->always_fail = -1;
  f->hang_id = -1;
  keel_verify_opts_init(&f->o);
  f->o.conninfo = kt_pg_conninfo();
  f->o.table = f->table;
  f->o.data = f;
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((fx *)data)->closed = true;
}

static bool is_closed(void *ctx) {
  return ((fx *)ctx)->closed;
}

static void fx_finish(fx *f) {
  if (f->v) {
    keel_verify_close(f->v, on_closed, f);
    cr_expect(kt_wait_for(&f->loop, is_closed, f, 5000), "close callback not called");
    f->v = NULL;
  }
  if (f->pool) {
    keel_pg_pool_close(f->pool, NULL, NULL);
    f->pool = NULL;
  }
  kt_loop_finish(&f->loop);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", f->table);
}

static void on_run_done(keel_verify *v, int status, void *data) {
  (void)v;
  fx *f = data;
  f->runs_done++;
  f->last_status = status;
}

static bool one_run(void *ctx) {
  return ((fx *)ctx)->runs_done >= 1;
}
static bool two_runs(void *ctx) {
  return ((fx *)ctx)->runs_done >= 2;
}

static long row_id(const keel_verify_row *row) {
  const char *s = keel_verify_row_get(row, "id");
  return s ? strtol(s, NULL, 10) : -1;
}

static void record(fx *f, long id) {
  if (f->nseen > 0 && f->seen[f->nseen - 1] >= id) f->order_ok = false;
  if (f->nseen < (int)(sizeof f->seen / sizeof f->seen[0])) f->seen[f->nseen++] = id;
}

static bool seen(const fx *f, long id) {
  for (int i = 0; i < f->nseen; i++)
    if (f->seen[i] == id) return true;
  return false;
}

static keel_verify_stats stats(const fx *f) {
  keel_verify_stats st;
  keel_verify_get_stats(f->v, &st);
  return st;
}

/* ---- the seed's orders example -------------------------------------------------- */

static bool orders_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  fx *f = data;
  record(f, row_id(row));
  const char *status = keel_verify_row_get(row, "status");
  const char *pay = keel_verify_row_get(row, "payment_status");
  if (status == NULL) keel_verify_row_problem(row, "missing_status");
  if (status && strcmp(status, "completed") == 0 && keel_verify_row_is_null(row, "completion_date"))
    keel_verify_row_problem(row, "missing_completion_date");
  if (pay && strcmp(pay, "paid") == 0 && keel_verify_row_is_null(row, "payment_id"))
    keel_verify_row_problem(row, "missing_payment_id");
  return true;
}

typedef struct fixctx {
  fx *f;
  keel_verify_fix *fix;
  int left;
  int status;
} fixctx;

static void fix_stmt_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  fixctx *x = data;
  if (status < 0) {
    x->status = status;
    cr_log_warn("fix-up statement failed: %s", keel_pg_last_error(c));
  }
  if (--x->left == 0) {
    cr_expect_eq(keel_verify_fix_done(x->fix, x->status), 0);
    free(x);
  }
}

static void orders_fix(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                       void *data) {
  (void)v;
  fx *f = data;
  f->fix_calls++;
  const char *id = keel_verify_row_get(row, "id");
  const char *status = keel_verify_row_get(row, "status");
  const char *pay = keel_verify_row_get(row, "payment_status");
  char sql[512];
  fixctx *x = calloc(1, sizeof *x);
  x->f = f;
  x->fix = fix;
  x->left = 1;
  const char *params[1] = {id};
  /* one statement repairs everything the validator can find */
  snprintf(sql, sizeof sql,
           "UPDATE \"%s\" SET status = COALESCE(status, 'pending'), "
           "completion_date = CASE WHEN status = 'completed' THEN COALESCE(completion_date, now()) "
           "ELSE completion_date END, "
           "payment_id = CASE WHEN payment_status = 'paid' THEN COALESCE(payment_id, 'unknown') "
           "ELSE payment_id END WHERE id = $1",
           f->table);
  (void)status, (void)pay;
  cr_assert_eq(keel_pg_pool_query(f->pool, sql, 1, params, fix_stmt_done, x), 0);
}

static void make_orders(const char *table, int n) {
  kt_pg_execf(
      "CREATE TABLE \"%s\" (id bigint PRIMARY KEY, status text, payment_status text, "
      "payment_id text, completion_date timestamptz, note text)",
      table);
  kt_pg_execf(
      "INSERT INTO \"%s\" SELECT g, 'new', 'unpaid', NULL, NULL, 'x' FROM generate_series(1, %d) g",
      table, n);
}

Test(verify_pg, orders_example_end_to_end) {
  fx f;
  fx_init(&f, "vorders");
  make_orders(f.table, 100);
  /* completed without completion_date: ids 10,20..100 (10 rows) */
  kt_pg_execf("UPDATE \"%s\" SET status = 'completed' WHERE id %% 10 = 0", f.table);
  /* paid without payment_id: ids 7..98 (14 rows) */
  kt_pg_execf("UPDATE \"%s\" SET payment_status = 'paid' WHERE id %% 7 = 0", f.table);
  kt_pg_execf("UPDATE \"%s\" SET status = NULL WHERE id = 33", f.table);
  /* valid completed and paid rows */
  kt_pg_execf(
      "UPDATE \"%s\" SET status = 'completed', completion_date = now(), payment_status = 'paid', "
      "payment_id = 'p1' WHERE id = 1",
      f.table);

  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 2;
  cr_assert_eq(keel_pg_pool_new(&f.loop, &po, &f.pool), 0);

  f.o.pool = f.pool;
  f.o.conninfo = NULL;
  f.o.batch_size = 50; /* the seed's */
  f.o.validate = orders_validator;
  f.o.fix = orders_fix;
  f.o.fix_concurrency = 3;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_expect_eq(keel_verify_run_now(f.v), KEEL_EINPROGRESS);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "first run did not finish: %s",
            keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_started, 1);
  cr_expect_eq(st.runs_completed, 1);
  cr_expect_eq(st.runs_skipped, 1);
  cr_expect_eq(st.rows_scanned, 100);
  cr_expect_eq(st.rows_last_run, 100);
  cr_expect_eq(st.rows_invalid, 24);
  cr_expect_eq(st.rows_valid, 76);
  cr_expect_eq(st.problems_last_run, 25);
  cr_expect_eq(st.problems_total, 25);
  cr_expect_eq(st.fixes_attempted, 24);
  cr_expect_eq(st.fixes_succeeded, 24, "%s", keel_verify_last_error(f.v));
  cr_expect_eq(st.fixes_failed, 0);
  cr_expect_eq(st.batches, 2 + 1, "batches %" PRIu64, st.batches); /* 50 + 50 + empty */
  cr_expect_str_eq(st.last_key, "100");
  cr_expect_not(st.running);
  cr_expect(st.leader);
  cr_expect_eq(st.next_run_ms, 0); /* not started */
  cr_expect_gt(st.rows_per_s, 0.0);
  cr_assert_eq(st.ncodes, 3);
  cr_expect_str_eq(st.top_codes[0].code, "missing_payment_id");
  cr_expect_eq(st.top_codes[0].total, 14);
  cr_expect_eq(st.top_codes[0].last_run, 14);
  cr_expect_str_eq(st.top_codes[1].code, "missing_completion_date");
  cr_expect_eq(st.top_codes[1].total, 10);
  cr_expect_str_eq(st.top_codes[2].code, "missing_status");
  cr_expect_eq(st.top_codes[2].total, 1);
  cr_expect(f.order_ok);
  cr_expect_eq(f.nseen, 100);

  /* the fixes are in the table */
  char *bad = kt_pg_scalarf(
      "SELECT count(*) FROM \"%s\" WHERE status IS NULL OR (status = 'completed' "
      "AND completion_date IS NULL) OR (payment_status = 'paid' AND payment_id IS NULL)",
      f.table);
  cr_expect_str_eq(bad, "0");
  free(bad);

  /* second run: nothing left to find */
  f.nseen = 0;
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, two_runs, &f, 10000));
  st = stats(&f);
  cr_expect_eq(f.last_status, 0);
  cr_expect_eq(st.runs_completed, 2);
  cr_expect_eq(st.problems_last_run, 0);
  cr_expect_eq(st.problems_total, 25);
  cr_expect_eq(st.rows_scanned, 200);
  cr_expect_eq(st.rows_invalid, 24);
  cr_expect_eq(st.top_codes[0].last_run, 0);
  cr_expect_eq(st.top_codes[0].total, 14);
  cr_expect_eq(f.fix_calls, 24);

  /* start(): next run time is scheduled */
  f.o.interval_ms = 60000;
  cr_expect_eq(keel_verify_start(f.v), 0);
  st = stats(&f);
  cr_expect_gt(st.next_run_ms, 0);
  cr_expect_eq(keel_verify_stop(f.v), 0);
  fx_finish(&f);
}

/* ---- keyset walks ------------------------------------------------------------ */

static bool record_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  record(data, row_id(row));
  return true;
}

typedef struct mutator {
  fx f;
  long at;
} mutator;

/* While walking, change the table: delete rows ahead, insert rows behind,
 * ahead (within the run's bound) and beyond the bound. */
static bool mutating_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  mutator *m = data;
  long id = row_id(row);
  record(&m->f, id);
  if (id == m->at) {
    kt_pg_execf("DELETE FROM \"%s\" WHERE id IN (106, 155, 498)", m->f.table);
    kt_pg_execf("INSERT INTO \"%s\" VALUES (2), (157), (100000)", m->f.table);
  }
  return true;
}

Test(verify_pg, keyset_over_gaps_and_concurrent_changes) {
  mutator m;
  fx_init(&m.f, "vgaps");
  m.at = 29;
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY)", m.f.table);
  /* ids 1, 8, 15, ... 498: gaps of 7 */
  kt_pg_execf("INSERT INTO \"%s\" SELECT g FROM generate_series(1, 500, 7) g", m.f.table);
  m.f.o.data = &m;
  m.f.o.batch_size = 10;
  m.f.o.validate = mutating_validator;
  m.f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&m.f.loop, &m.f.o, &m.f.v), 0);
  cr_assert_eq(keel_verify_run_now(m.f.v), 0);
  cr_assert(kt_wait_for(&m.f.loop, one_run, &m.f, 10000), "%s", keel_verify_last_error(m.f.v));
  cr_expect_eq(m.f.last_status, 0);
  cr_expect(m.f.order_ok, "rows were not visited in strictly increasing key order");
  cr_expect(seen(&m.f, 498) == false, "a row deleted ahead was visited");
  cr_expect(seen(&m.f, 155) == false);
  cr_expect(seen(&m.f, 2) == false, "a row inserted behind was visited");
  cr_expect(seen(&m.f, 157), "a row inserted ahead was missed");
  cr_expect(seen(&m.f, 100000) == false, "a row beyond the run's bound was visited");
  /* 72 ids at start, minus 2 deleted ahead (106 was deleted after prefetch
   * or not: it is in batch 2 (85..148)), plus 157 */
  keel_verify_stats st = stats(&m.f);
  cr_expect_eq(st.rows_scanned, (uint64_t)m.f.nseen);
  cr_expect(m.f.nseen == 71 || m.f.nseen == 70, "seen %d", m.f.nseen);

  /* next run sees the new rows, still once each */
  m.f.nseen = 0;
  m.at = -1;
  cr_assert_eq(keel_verify_run_now(m.f.v), 0);
  cr_assert(kt_wait_for(&m.f.loop, two_runs, &m.f, 10000));
  cr_expect(m.f.order_ok);
  cr_expect(seen(&m.f, 2) && seen(&m.f, 100000));
  cr_expect_eq(m.f.nseen, 72 - 3 + 3);
  fx_finish(&m.f);
}

static bool composite_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  fx *f = data;
  const char *t = keel_verify_row_get(row, "tenant");
  const char *s = keel_verify_row_get(row, "seq");
  long id = (long)(t[0] - 'a') * 1000 + strtol(s, NULL, 10);
  record(f, id);
  if (strtol(s, NULL, 10) % 5 == 0) keel_verify_row_problem(row, "fifth");
  return true;
}

Test(verify_pg, composite_key_and_quoted_names) {
  fx f;
  fx_init(&f, "vComp");
  char base[64], sqlname[128];
  snprintf(base, sizeof base, "%.60s", f.table);
  /* the table's name holds a double quote: "<base>""q" in SQL */
  snprintf(f.table, sizeof f.table, "%s\"q", base);
  snprintf(sqlname, sizeof sqlname, "%s\"\"q", base);
  kt_pg_execf(
      "CREATE TABLE \"%s\" (tenant text, seq int, \"select\" text, PRIMARY KEY (tenant, seq))",
      sqlname);
  kt_pg_execf(
      "INSERT INTO \"%s\" SELECT t, g, 'x' FROM unnest(ARRAY['a','b','c']) t, "
      "generate_series(1, 25) g",
      sqlname);
  static const char *const cols[] = {"select", NULL};
  f.o.columns = cols;
  f.o.id_columns[0] = "tenant";
  f.o.id_columns[1] = "seq";
  f.o.batch_size = 7;
  f.o.validate = composite_validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0, "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.nseen, 75);
  cr_expect(f.order_ok);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.rows_invalid, 15);
  cr_expect_str_eq(st.last_key, "c,25");
  keel_verify_close(f.v, on_closed, &f);
  cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000));
  f.v = NULL;
  kt_loop_finish(&f.loop);
  kt_pg_execf("DROP TABLE \"%s\"", sqlname);
}

/* ---- overlap, failures, retries, timeouts ------------------------------------------- */

static bool even_invalid(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  record(data, row_id(row));
  return row_id(row) % 2 == 1;
}

typedef struct delayed {
  uv_timer_t t;
  keel_verify_fix *fix;
  int status;
  fx *f;
} delayed;

static void delayed_closed(uv_handle_t *h) {
  free(h->data);
}

static void delayed_fire(uv_timer_t *t) {
  delayed *d = t->data;
  d->f->fixes_out--;
  keel_verify_fix_done(d->fix, d->status);
  uv_close((uv_handle_t *)t, delayed_closed);
}

static void generic_fix(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                        void *data) {
  fx *f = data;
  f->fix_calls++;
  keel_verify_stats st;
  keel_verify_get_stats(v, &st);
  cr_expect(st.running, "a fix-up ran outside a run");
  long id = row_id(row);
  unsigned attempt = keel_verify_fix_attempt(fix);
  if (id == f->hang_id && attempt == 1) {
    f->hung = fix; /* never reports: times out */
    return;
  }
  int status = 0;
  if (id == f->always_fail || (int)attempt <= f->fail_times) status = KEEL_EPG;
  if (f->fix_delay_ms == 0) {
    cr_expect_eq(keel_verify_fix_done(fix, status), 0);
    return;
  }
  delayed *d = calloc(1, sizeof *d);
  d->fix = fix;
  d->status = status;
  d->f = f;
  uv_timer_init(&f->loop, &d->t);
  d->t.data = d;
  uv_timer_start(&d->t, delayed_fire, f->fix_delay_ms, 0);
  if (++f->fixes_out > f->max_fixes_out) f->max_fixes_out = f->fixes_out;
}

static void make_ids(const char *table, int n) {
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY, v text)", table);
  kt_pg_execf("INSERT INTO \"%s\" SELECT g, 'x' FROM generate_series(1, %d) g", table, n);
}

Test(verify_pg, no_overlap_with_slow_fixup) {
  fx f;
  fx_init(&f, "voverlap");
  make_ids(f.table, 6); /* 3 invalid rows: 2, 4, 6 */
  f.o.validate = even_invalid;
  f.o.fix = generic_fix;
  f.o.fix_concurrency = 2;
  f.fix_delay_ms = 150;
  f.o.interval_ms = 25;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_start(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_leq(st.runs_started, st.runs_completed + 1, "two runs overlapped");
  cr_expect_geq(st.runs_completed, 1);
  cr_expect_geq(st.runs_skipped, 3, "skipped %" PRIu64, st.runs_skipped);
  cr_expect_geq(st.fixes_succeeded, 3);
  cr_expect_eq(f.max_fixes_out, 2, "fix_concurrency not respected: %d", f.max_fixes_out);
  cr_expect_geq(st.last_run_duration_ms, 250);
  cr_expect_eq(keel_verify_stop(f.v), 0);
  fx_finish(&f);
}

Test(verify_pg, fix_failures_and_retries) {
  fx f;
  fx_init(&f, "vretry");
  make_ids(f.table, 6); /* invalid: 2, 4, 6 */
  f.o.validate = even_invalid;
  f.o.fix = generic_fix;
  f.o.fix_max_retries = 3;
  keel_backoff_fixed(&f.o.fix_backoff, 5);
  f.fail_times = 2;  /* attempts 1 and 2 fail, 3 succeeds */
  f.always_fail = 4; /* 4 attempts, then failed for good */
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.fixes_succeeded, 2);
  cr_expect_eq(st.fixes_failed, 1);
  cr_expect_eq(st.fixes_attempted, 3 + 3 + 4, "attempted %" PRIu64, st.fixes_attempted);
  cr_expect_eq(st.fixes_retried, 2 + 2 + 3);
  cr_expect_eq(st.fixes_pending, 0);
  cr_expect(strstr(st.last_error, "failed for good") != NULL || st.fixes_failed == 1);
  cr_expect(strstr(keel_verify_last_error(f.v), "fix-up of row") != NULL, "%s",
            keel_verify_last_error(f.v));
  fx_finish(&f);
}

Test(verify_pg, fixup_timeout) {
  fx f;
  fx_init(&f, "vtimeout");
  make_ids(f.table, 4); /* invalid: 2, 4 */
  f.o.validate = even_invalid;
  f.o.fix = generic_fix;
  f.o.fix_timeout_ms = 60;
  keel_backoff_fixed(&f.o.fix_backoff, 1);
  f.hang_id = 2;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.fixes_timed_out, 1);
  cr_expect_eq(st.fixes_succeeded, 2);
  cr_expect_eq(st.fixes_attempted, 3);
  cr_expect_eq(st.fixes_failed, 0);
  cr_assert_not_null(f.hung);
  /* the late report of the timed-out attempt is stale (and frees it) */
  cr_expect_eq(keel_verify_fix_done(f.hung, 0), KEEL_ESTALE);
  st = stats(&f);
  cr_expect_eq(st.fixes_succeeded, 2);
  fx_finish(&f);
}

/* ---- leader election ---------------------------------------------------------- */

typedef struct pair {
  fx a, b;
} pair;

static bool count_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)row, (void)data;
  return true;
}

static bool both_ticked(void *ctx) {
  pair *p = ctx;
  keel_verify_stats a, b;
  keel_verify_get_stats(p->a.v, &a);
  keel_verify_get_stats(p->b.v, &b);
  return a.runs_completed + b.runs_completed >= 2 && a.runs_not_leader + b.runs_not_leader >= 2;
}

static bool b_ran(void *ctx) {
  pair *p = ctx;
  keel_verify_stats b;
  keel_verify_get_stats(p->b.v, &b);
  return b.runs_completed >= 1;
}

static bool a_led(void *ctx) {
  pair *p = ctx;
  keel_verify_stats a;
  keel_verify_get_stats(p->a.v, &a);
  return a.runs_completed >= 1;
}

static bool a_not_leader(void *ctx) {
  pair *p = ctx;
  keel_verify_stats a;
  keel_verify_get_stats(p->a.v, &a);
  return !a.leader;
}

/* The leader election setup_pair_ex() uses (the default lease unless a
 * test needs the session-level advisory lock). */
static keel_verify_leader_kind pair_kind = KEEL_VERIFY_LEADER_LEASE;

static void setup_pair_ex(pair *p, const char *prefix, int64_t key, uint64_t a_interval,
                          bool pools) {
  fx_init(&p->a, prefix);
  make_ids(p->a.table, 20);
  fx_init(&p->b, prefix);
  uv_loop_close(&p->b.loop); /* b shares a's loop */
  memcpy(p->b.table, p->a.table, sizeof p->a.table);
  p->b.o.table = p->b.table;
  keel_verify_opts *os[2] = {&p->a.o, &p->b.o};
  for (int i = 0; i < 2; i++) {
    os[i]->validate = count_validator;
    os[i]->leader_lock = true;
    os[i]->leader_lock_key = key;
    os[i]->leader_kind = pair_kind;
    os[i]->interval_ms = 40;
  }
  p->a.o.interval_ms = a_interval;
  if (pools) {
    keel_pg_pool_opts po;
    keel_pg_pool_opts_init(&po);
    po.conn.conninfo = kt_pg_conninfo();
    po.size = 2;
    cr_assert_eq(keel_pg_pool_new(&p->a.loop, &po, &p->a.pool), 0);
    cr_assert_eq(keel_pg_pool_new(&p->a.loop, &po, &p->b.pool), 0);
    p->a.o.pool = p->a.pool;
    p->b.o.pool = p->b.pool;
    p->a.o.conninfo = p->b.o.conninfo = NULL;
  }
  cr_assert_eq(keel_verify_new(&p->a.loop, &p->a.o, &p->a.v), 0);
  cr_assert_eq(keel_verify_new(&p->a.loop, &p->b.o, &p->b.v), 0);
}

static void setup_pair(pair *p, const char *prefix, int64_t key, uint64_t a_interval) {
  setup_pair_ex(p, prefix, key, a_interval, false);
}

static bool pair_closed(void *ctx) {
  pair *p = ctx;
  return p->a.closed && p->b.closed;
}

static void finish_pair(pair *p) {
  if (p->a.v)
    keel_verify_close(p->a.v, on_closed, &p->a);
  else
    p->a.closed = true;
  keel_verify_close(p->b.v, on_closed, &p->b);
  cr_expect(kt_wait_for(&p->a.loop, pair_closed, p, 5000));
  keel_pg_pool_close(p->a.pool, NULL, NULL);
  keel_pg_pool_close(p->b.pool, NULL, NULL);
  kt_loop_finish(&p->a.loop);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", p->a.table);
}

Test(verify_pg, leader_election_two_verifiers) {
  pair p;
  int64_t key = 0x5eed0000 + (int64_t)getpid();
  setup_pair(&p, "vleader", key, 40);
  cr_assert_eq(keel_verify_start(p.a.v), 0);
  cr_assert(kt_wait_for(&p.a.loop, a_led, &p, 5000), "%s", keel_verify_last_error(p.a.v));
  cr_assert_eq(keel_verify_start(p.b.v), 0);
  cr_assert(kt_wait_for(&p.a.loop, both_ticked, &p, 5000));
  keel_verify_stats a, b;
  keel_verify_get_stats(p.a.v, &a);
  keel_verify_get_stats(p.b.v, &b);
  cr_expect(a.leader);
  cr_expect_not(b.leader);
  cr_expect_geq(a.runs_completed, 2);
  cr_expect_eq(b.runs_started, 0, "the follower ran");
  cr_expect_geq(b.runs_not_leader, 2);
  cr_expect_geq(a.rows_scanned, 20 * a.runs_completed);

  /* the leader's process goes away: the other takes over at its next tick */
  keel_verify_close(p.a.v, on_closed, &p.a);
  p.a.v = NULL;
  cr_assert(kt_wait_for(&p.a.loop, b_ran, &p, 5000), "%s", keel_verify_last_error(p.b.v));
  keel_verify_get_stats(p.b.v, &b);
  cr_expect(b.leader);
  finish_pair(&p);
}

Test(verify_pg, leader_election_on_pools) {
  pair p;
  int64_t key = 0x5ef00000 + (int64_t)getpid();
  setup_pair_ex(&p, "vlpool", key, 40, true);
  cr_assert_eq(keel_verify_start(p.a.v), 0);
  cr_assert(kt_wait_for(&p.a.loop, a_led, &p, 5000), "%s", keel_verify_last_error(p.a.v));
  cr_assert_eq(keel_verify_start(p.b.v), 0);
  cr_assert(kt_wait_for(&p.a.loop, both_ticked, &p, 5000));
  keel_verify_stats b;
  keel_verify_get_stats(p.b.v, &b);
  cr_expect_eq(b.runs_started, 0, "the follower ran");
  /* a closes but its pool lives on: the pooled session must drop the lock */
  keel_verify_close(p.a.v, on_closed, &p.a);
  p.a.v = NULL;
  cr_assert(kt_wait_for(&p.a.loop, b_ran, &p, 5000), "%s", keel_verify_last_error(p.b.v));
  keel_verify_get_stats(p.b.v, &b);
  cr_expect(b.leader);
  finish_pair(&p);
}

Test(verify_pg, leader_connection_loss_hands_over) {
  pair p;
  KT_SKIP_BEHIND_POOLER("a session-level advisory lock, killed with its session");
  int64_t key = 0x5eef0000 + (int64_t)getpid();
  pair_kind = KEEL_VERIFY_LEADER_ADVISORY; /* a session's lock: lost with the session */
  setup_pair(&p, "vloss", key, 1500);      /* a ticks rarely after its first run */
  pair_kind = KEEL_VERIFY_LEADER_LEASE;
  cr_assert_eq(keel_verify_start(p.a.v), 0);
  cr_assert(kt_wait_for(&p.a.loop, a_led, &p, 5000), "%s", keel_verify_last_error(p.a.v));
  cr_assert_eq(keel_verify_start(p.b.v), 0);
  /* b is refused while a holds the lock */
  for (int i = 0; i < 5; i++) uv_run(&p.a.loop, UV_RUN_ONCE);
  keel_verify_stats b;
  keel_verify_get_stats(p.b.v, &b);
  cr_expect_eq(b.runs_started, 0);
  /* kill a's lock session */
  char *n = kt_pg_scalarf(
      "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE "
      "locktype = 'advisory' AND granted AND classid::bigint = %" PRId64
      " AND objid::bigint = %" PRId64,
      (key >> 32) & 0xffffffff, key & 0xffffffff);
  cr_expect_str_eq(n, "1");
  free(n);
  cr_assert(kt_wait_for(&p.a.loop, b_ran, &p, 5000), "%s", keel_verify_last_error(p.b.v));
  keel_verify_get_stats(p.b.v, &b);
  cr_expect(b.leader);
  /* a learns of its lost session when its socket reports it, which may come
   * after b took the lock */
  cr_expect(kt_wait_for(&p.a.loop, a_not_leader, &p, 5000), "a still believes it leads");
  keel_verify_stats a;
  keel_verify_get_stats(p.a.v, &a);
  cr_expect_not(a.leader);
  cr_expect_eq(a.runs_started, 1);
  finish_pair(&p);
}

/* ---- checkpoint resume and close mid-run ------------------------------------------- */

static bool closing_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  fx *f = data;
  long id = row_id(row);
  record(f, id);
  if (id == 55) keel_verify_close(v, on_closed, f);
  return true;
}

Test(verify_pg, checkpoint_resume_after_restart) {
  fx f;
  fx_init(&f, "vckpt");
  make_ids(f.table, 100);
  char ck[96];
  kt_unique_name(ck, sizeof ck, "vckpt_progress");
  f.o.checkpoint_table = ck;
  f.o.checkpoint_every = 1;
  f.o.batch_size = 10;
  f.o.validate = closing_validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  /* the "process" dies mid-run: close from inside the validator */
  cr_assert(kt_wait_for(&f.loop, is_closed, &f, 10000), "%s", "not closed");
  cr_expect_eq(f.runs_done, 1, "the run close dropped reports once");
  cr_expect_eq(f.last_status, UV_ECANCELED);
  f.runs_done = 0;
  f.last_status = 1;
  f.v = NULL;
  /* (the checkpoint of batch 5 may still be committing: the restart below
   * sees 40 or 50) */
  /* restart: a new verifier resumes after the checkpoint */
  f.nseen = 0;
  f.closed = false;
  f.o.validate = record_validator;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 10000), "%s", keel_verify_last_error(f.v));
  cr_expect_eq(f.last_status, 0, "%s", keel_verify_last_error(f.v));
  cr_assert_gt(f.nseen, 0);
  long resume_after = f.seen[0] - 1;
  cr_expect(resume_after == 40 || resume_after == 50, "resumed after %ld", resume_after);
  cr_expect(f.order_ok);
  cr_expect_eq(f.nseen, 100 - resume_after, "seen %d rows from %ld to %ld, checkpoint %ld", f.nseen,
               f.seen[0], f.seen[f.nseen - 1], resume_after);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.rows_scanned, (uint64_t)(100 - resume_after));
  /* a completed run clears the checkpoint: the next one starts over */
  f.nseen = 0;
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, two_runs, &f, 10000));
  cr_expect_eq(f.nseen, 100);
  cr_expect_eq(f.seen[0], 1);
  char *cleared =
      kt_pg_scalarf("SELECT last_key IS NULL FROM \"%s\" WHERE job = '%s'", ck, f.table);
  cr_expect_str_eq(cleared, "t");
  free(cleared);
  fx_finish(&f);
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", ck);
}

static void holding_fix(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                        void *data) {
  (void)v, (void)row;
  fx *f = data;
  f->hung = fix; /* keep it: the verifier closes meanwhile */
  f->fix_calls++;
}

static bool fix_called(void *ctx) {
  return ((fx *)ctx)->fix_calls > 0;
}

Test(verify_pg, close_mid_run_with_fixup_out) {
  fx f;
  fx_init(&f, "vclose");
  make_ids(f.table, 300);
  f.o.batch_size = 20;
  f.o.validate = even_invalid;
  f.o.fix = holding_fix;
  f.o.fix_concurrency = 1;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_start(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, fix_called, &f, 10000), "%s", keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect(st.running);
  cr_expect_eq(st.fixes_running, 1);
  keel_verify_close(f.v, on_closed, &f);
  cr_expect_eq(keel_verify_run_now(f.v), KEEL_ECLOSING);
  cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000));
  f.v = NULL;
  cr_expect_eq(f.runs_done, 1, "the run close dropped reports once");
  cr_expect_eq(f.last_status, UV_ECANCELED);
  cr_expect_eq(keel_verify_fix_done(f.hung, 0), KEEL_ESTALE);
  fx_finish(&f);
}

Test(verify_pg, stop_mid_run_ends_with_ecanceled) {
  fx f;
  fx_init(&f, "vstop");
  make_ids(f.table, 200);
  f.o.batch_size = 10;
  f.o.validate = record_validator;
  f.o.on_run_done = on_run_done;
  f.o.interval_ms = 100000;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_start(f.v), 0);
  while (f.nseen == 0) uv_run(&f.loop, UV_RUN_ONCE);
  cr_expect_eq(keel_verify_stop(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 5000));
  cr_expect_eq(f.last_status, UV_ECANCELED);
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_lt(st.rows_scanned, 200);
  cr_expect_eq(st.next_run_ms, 0);
  fx_finish(&f);
}

Test(verify_pg, sql_error_ends_run_with_message) {
  fx f;
  fx_init(&f, "vmissing"); /* no such table */
  f.o.validate = record_validator;
  f.o.on_run_done = on_run_done;
  cr_assert_eq(keel_verify_new(&f.loop, &f.o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, one_run, &f, 5000));
  cr_expect_eq(f.last_status, KEEL_EPG);
  cr_expect(strstr(keel_verify_last_error(f.v), "does not exist") != NULL, "%s",
            keel_verify_last_error(f.v));
  keel_verify_stats st = stats(&f);
  cr_expect_eq(st.runs_failed, 1);
  cr_expect_eq(st.runs_completed, 0);
  fx_finish(&f);
}

Test(verify_pg, new_under_failing_allocator) {
  kt_alloc_install();
  static const char *const cols[] = {"status", "note", NULL};
  bool succeeded = false;
  for (int64_t i = 0; i < 400 && !succeeded; i++) {
    uv_loop_t loop;
    cr_assert_eq(uv_loop_init(&loop), 0);
    keel_verify_opts o;
    keel_verify_opts_init(&o);
    o.conninfo = kt_pg_conninfo();
    o.table = "app.orders";
    o.columns = cols;
    o.where = "true";
    o.validate = count_validator;
    o.leader_lock = true;
    o.checkpoint_table = "app.progress";
    keel_verify *v = NULL;
    kt_alloc_fail_after(i);
    int rc = keel_verify_new(&loop, &o, &v);
    kt_alloc_fail_after(-1);
    if (rc == 0) {
      succeeded = true;
      keel_verify_close(v, NULL, NULL);
    } else {
      cr_expect_eq(rc, UV_ENOMEM, "allocation %" PRId64 ": %s", i, keel_err_name(rc));
      cr_expect_null(v);
    }
    kt_loop_finish(&loop);
    cr_expect_eq(kt_alloc_live_blocks(), 0, "allocation %" PRId64 " leaked", i);
  }
  cr_expect(succeeded);
}

/* ---- injected clock and re-entrancy ----------------------------------------------- */

typedef struct clocked {
  fx f;
  uint64_t now;
  keel_verify_stats first; /* stats seen at the end of the first run */
} clocked;

static uint64_t test_now(void *data) {
  return ((clocked *)data)->now;
}

static bool clock_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v;
  clocked *c = data;
  record(&c->f, row_id(row));
  c->now = 5000; /* the run "takes" 4 s of the injected clock */
  return true;
}

static void close_on_second_run(keel_verify *v, int status, void *data) {
  clocked *c = data;
  c->f.runs_done++;
  c->f.last_status = status;
  if (c->f.runs_done == 1) {
    keel_verify_get_stats(v, &c->first);
    c->now = 1000;                           /* the second run starts at 1000 again */
    cr_expect_eq(keel_verify_run_now(v), 0); /* from inside the callback */
  } else {
    keel_verify_close(v, on_closed, &c->f); /* close from inside the callback */
  }
}

Test(verify_pg, injected_clock_and_reentrant_callbacks) {
  clocked c;
  fx_init(&c.f, "vclock");
  make_ids(c.f.table, 40);
  c.now = 1000;
  c.f.o.data = &c;
  c.f.o.clock.now = test_now;
  c.f.o.clock.data = &c;
  c.f.o.validate = clock_validator;
  c.f.o.on_run_done = close_on_second_run;
  c.f.o.interval_ms = 60000;
  cr_assert_eq(keel_verify_new(&c.f.loop, &c.f.o, &c.f.v), 0);
  cr_assert_eq(keel_verify_start(c.f.v), 0);
  keel_verify_stats st;
  keel_verify_get_stats(c.f.v, &st);
  cr_expect_geq(st.next_run_ms, 1000);
  cr_expect_leq(st.next_run_ms, 1000 + 60000);
  cr_assert(kt_wait_for(&c.f.loop, is_closed, &c.f, 5000), "not closed from on_run_done");
  st = c.first;
  cr_expect_eq(st.last_run_started_ms, 1000);
  cr_expect_eq(st.last_run_duration_ms, 4000);
  cr_expect_eq(st.rows_last_run, 40);
  cr_expect_eq(st.rows_per_s, 10.0);
  cr_expect_geq(st.next_run_ms, 5000);
  c.f.v = NULL;
  cr_expect_eq(c.f.runs_done, 2);
  cr_expect_eq(c.f.last_status, 0);
  cr_expect_eq(c.f.nseen, 80);
  fx_finish(&c.f);
}

static bool run_or_closed(void *ctx) {
  fx *f = ctx;
  return f->runs_done > 0 || f->closed;
}

/* Every allocation of a whole run (verifier and pg layer) fails in turn: the
 * run ends cleanly (status 0 or an error), nothing leaks, the loop closes. */
Test(verify_pg, run_under_failing_allocator) {
  fx f;
  fx_init(&f, "voom");
  uv_loop_close(&f.loop);
  make_ids(f.table, 12);
  kt_alloc_install();
  bool clean_run = false;
  int iterations = 0;
  for (int64_t i = 0; i < 1000 && !clean_run; i += 1) {
    iterations++;
    cr_assert_eq(uv_loop_init(&f.loop), 0);
    f.runs_done = 0;
    f.last_status = 1;
    f.closed = false;
    f.nseen = 0;
    f.o.batch_size = 5;
    f.o.validate = even_invalid;
    f.o.fix = generic_fix;
    f.o.on_run_done = on_run_done;
    f.v = NULL;
    kt_alloc_fail_after(i);
    int rc = keel_verify_new(&f.loop, &f.o, &f.v);
    if (rc == 0) rc = keel_verify_run_now(f.v);
    if (rc == 0) {
      kt_wait_for(&f.loop, run_or_closed, &f, 3000);
      kt_alloc_fail_after(-1);
      if (f.runs_done > 0 && f.last_status == 0 && f.nseen == 12) {
        keel_verify_stats st;
        keel_verify_get_stats(f.v, &st);
        clean_run = st.fixes_succeeded == 6;
      }
      keel_verify_close(f.v, on_closed, &f);
      cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000), "allocation %" PRId64 ": close hung", i);
    } else {
      kt_alloc_fail_after(-1);
      if (f.v) {
        keel_verify_close(f.v, on_closed, &f);
        kt_wait_for(&f.loop, is_closed, &f, 5000);
      }
    }
    f.v = NULL;
    kt_loop_finish(&f.loop);
    cr_expect_eq(kt_alloc_live_blocks(), 0, "allocation %" PRId64 " leaked", i);
  }
  cr_expect(clean_run);
  cr_expect_gt(iterations, 20, "only %d iterations", iterations);
  cr_log_info("%d iterations, %" PRIu64 " allocations", iterations, kt_alloc_count());
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\"", f.table);
}
