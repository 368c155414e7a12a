/* Durable queue against a real PostgreSQL: migrations (twice, and two
 * processes at once), enqueue (batch, inside a caller's transaction, unique
 * keys under 16 concurrent enqueuers, delayed, priorities), work (retries
 * following the backoff, dead and re-drive, timeouts, cancel in each state,
 * concurrency change, pause/resume), bad input, stats and close. */
#include "common.h"

static bool never(void *ctx) {
  (void)ctx;
  return false;
}

/* Runs the loop for ms (after blocking set-up calls: the loop's clock is
 * brought up to date first). */
static void settle(fx *f, uint64_t ms) {
  uv_update_time(&f->loop);
  kt_wait_for(&f->loop, never, NULL, ms);
}

static bool all_started(void *ctx) {
  fx *f = ctx;
  return f->started >= f->fail_first; /* reused as a target below */
}

typedef struct target {
  fx *f;
  const char *where;
  long want;
} target;

static bool rows_reach(void *ctx) {
  target *t = ctx;
  return fx_count(t->f, t->where) >= t->want;
}

static void wait_rows(fx *f, const char *where, long want, uint64_t ms) {
  target t = {f, where, want};
  uv_update_time(&f->loop);
  cr_assert(kt_wait_for(&f->loop, rows_reach, &t, ms), "rows where %s: %ld, want %ld (%s)", where,
            fx_count(f, where), want, keel_pgqueue_last_error(f->q));
}

Test(pgqueue, batch_enqueue_and_work) {
  fx f;
  fx_init(&f, "pgq_basic", NULL);
  f.o.concurrency = 4;
  fx_start(&f);
  keel_pgqueue_job_opts jobs[300];
  char payloads[300][32];
  for (int i = 0; i < 300; i++) {
    keel_pgqueue_job_opts_init(&jobs[i]);
    snprintf(payloads[i], sizeof payloads[i], "{\"n\":%d}", i);
    jobs[i].payload = payloads[i];
    jobs[i].kind = "noop";
  }
  cr_assert_eq(fx_enqueue(&f, jobs, 300), 0, "%s", keel_pgqueue_last_error(f.q));
  cr_assert_eq(f.nenq, 300);
  for (int i = 1; i < 300; i++) cr_assert_gt(f.enq[i].id, f.enq[i - 1].id, "ids in input order");
  wait_rows(&f, "state = 'done'", 300, 20000);
  cr_assert_eq(fx_count(&f, "state <> 'done'"), 0);
  cr_assert_eq(f.started, 300, "each job ran once");
  cr_assert_eq(fx_count(&f, "attempt <> 1"), 0);
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.completed, 300);
  cr_assert_eq(st.fetched, 300);
  cr_assert_eq(st.enqueued, 300);
  cr_assert_eq(st.lease_lost, 0);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, completion_rolled_back_by_a_serialization_failure_is_sent_again) {
  fx f;
  fx_init(&f, "pgq_serfail", NULL);
  f.o.concurrency = 4;
  fx_start(&f);
  /* The first three statements that mark jobs done fail with 40001, as
   * under default_transaction_isolation = serializable with concurrent
   * workers (a sequence: its increments survive the rollback). */
  kt_pg_execf("CREATE SEQUENCE %s.fail_seq", f.schema);
  kt_pg_execf(
      "CREATE FUNCTION %s.fail_done() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
      " IF nextval('%s.fail_seq') <= 3 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40001';"
      " END IF; RETURN NEW; END $$",
      f.schema, f.schema);
  kt_pg_execf(
      "CREATE TRIGGER fail_done BEFORE UPDATE ON %s.pgqueue_jobs FOR EACH ROW"
      " WHEN (NEW.state = 'done') EXECUTE FUNCTION %s.fail_done()",
      f.schema, f.schema);
  kt_pg_execf(
      "CREATE TRIGGER fail_done_del BEFORE DELETE ON %s.pgqueue_jobs FOR EACH ROW"
      " EXECUTE FUNCTION %s.fail_done()",
      f.schema, f.schema);
  keel_pgqueue_job_opts jobs[40];
  for (int i = 0; i < 40; i++) {
    keel_pgqueue_job_opts_init(&jobs[i]);
    jobs[i].payload = "{}";
    jobs[i].kind = "noop";
  }
  cr_assert_eq(fx_enqueue(&f, jobs, 40), 0, "%s", keel_pgqueue_last_error(f.q));
  /* Regression: the batch was dropped, and its jobs ran again when their
   * leases ran out (30 s). */
  wait_rows(&f, "state = 'done'", 40, 15000);
  cr_assert_eq(f.started, 40, "each job ran once");
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.flush_retries, 3);
  cr_assert_eq(st.completed, 40);
  cr_assert_eq(st.lease_lost, 0);
  char *n = kt_pg_scalarf("SELECT last_value FROM %s.fail_seq", f.schema);
  cr_assert_geq(atoi(n), 4, "the injected failures happened");
  free(n);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, migrate_twice_and_concurrently) {
  fx f;
  fx_init(&f, "pgq_mig", NULL);
  /* two objects migrating the same fresh schema at once, then a third */
  fx g = f;
  g.o.data = &g;
  cr_assert_eq(uv_loop_init(&g.loop), 0);
  keel_pgqueue *a, *b;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &f.o, &a), 0);
  f.o.process = NULL;
  f.o.on_ready = NULL;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &f.o, &b), 0);
  f.q = a;
  cr_assert(kt_wait_for(&f.loop, fx_is_ready, &f, 15000));
  cr_assert_eq(f.ready_status, 0, "%s", keel_pgqueue_last_error(a));
  keel_pgqueue_close(b, NULL, NULL);
  g.o.process = NULL;
  fx_start(&g);
  cr_assert_eq(g.ready_status, 0);
  char *v = kt_pg_scalarf(
      "SELECT string_agg(version::text, ',' ORDER BY version) FROM"
      " %s.pgqueue_migrations",
      f.schema);
  cr_assert_str_eq(v, "1,2");
  free(v);
  v = kt_pg_scalarf("SELECT reloptions::text FROM pg_class WHERE oid = '%s.pgqueue_jobs'::regclass",
                    f.schema);
  cr_assert(v && strstr(v, "fillfactor=70"), "%s", v ? v : "(null)");
  free(v);
  fx_finish(&g);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, bad_input_writes_nothing) {
  fx f;
  fx_init(&f, "pgq_bad", NULL);
  f.o.process = NULL;
  fx_start(&f);
  keel_pgqueue_job_opts j;
  struct {
    const char *queue, *payload, *key;
    int64_t delay;
    int max_attempts;
  } cases[] = {
      {"bad queue", NULL, NULL, 0, 0},   {"", NULL, NULL, 0, 0},
      {"q'; drop", NULL, NULL, 0, 0},    {NULL, "{not json", NULL, 0, 0},
      {NULL, "{\"a\":1} x", NULL, 0, 0}, {NULL, "[1,]", NULL, 0, 0},
      {NULL, NULL, NULL, -1, 0},         {NULL, NULL, "", 0, 0},
      {NULL, NULL, NULL, 0, -2},         {NULL, "\"\\u0000\"", NULL, 0, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    keel_pgqueue_job_opts_init(&j);
    j.queue = cases[i].queue;
    j.payload = cases[i].payload;
    j.unique_key = cases[i].key;
    j.delay_ms = cases[i].delay;
    j.max_attempts = cases[i].max_attempts;
    int rc = keel_pgqueue_enqueue(f.q, NULL, &j, 1, fx_enq_cb, &f);
    cr_assert_eq(rc, UV_EINVAL, "case %zu: %d", i, rc);
    cr_assert_neq(keel_pgqueue_last_error(f.q)[0], '\0', "case %zu has a reason", i);
  }
  /* a bad job inside a batch refuses the whole batch */
  keel_pgqueue_job_opts two[2];
  keel_pgqueue_job_opts_init(&two[0]);
  keel_pgqueue_job_opts_init(&two[1]);
  two[1].payload = "nope";
  cr_assert_eq(keel_pgqueue_enqueue(f.q, NULL, two, 2, fx_enq_cb, &f), UV_EINVAL);
  cr_assert(strstr(keel_pgqueue_last_error(f.q), "job 1") != NULL, "%s",
            keel_pgqueue_last_error(f.q));
  keel_backoff bad;
  keel_backoff_exponential(&bad, 100, 0.5, 0);
  keel_pgqueue_job_opts_init(&j);
  j.backoff = &bad;
  cr_assert_eq(keel_pgqueue_enqueue(f.q, NULL, &j, 1, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pgqueue_enqueue(f.q, NULL, &j, 0, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pgqueue_enqueue(NULL, NULL, &j, 1, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pgqueue_cancel(f.q, 0, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pgqueue_redrive(f.q, 1, 0, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pgqueue_set_concurrency(f.q, 0), UV_EINVAL);
  /* nothing at all was written */
  settle(&f, 300);
  cr_assert_eq(f.enq_done, 0, "no callback for a refused call");
  cr_assert_eq(fx_count(&f, "true"), 0);
  /* bad options */
  keel_pgqueue_opts o = f.o;
  keel_pgqueue *x = NULL;
  char why[256];
  o.queue = "has space";
  cr_assert_eq(keel_pgqueue_new_ex(&f.loop, &o, &x, why, sizeof why), UV_EINVAL);
  cr_assert(why[0] != '\0');
  o = f.o;
  o.schema = "Bad-Schema";
  cr_assert_eq(keel_pgqueue_new_ex(&f.loop, &o, &x, why, sizeof why), UV_EINVAL);
  o = f.o;
  o.concurrency = 0;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &o, &x), UV_EINVAL);
  o = f.o;
  o.lease_ms = 100;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &o, &x), UV_EINVAL);
  o = f.o;
  o.conninfo = NULL;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &o, &x), UV_EINVAL);
  cr_assert_null(x, "out untouched");
  fx_finish(&f);
  fx_drop(&f);
}

/* ---- unique keys under 16 concurrent enqueuers -------------------------------- */

typedef struct uq {
  fx *f;
  int done;
  int64_t ids[16][40];
  int existed[16];
  int rounds[16]; /* answers so far per enqueuer (in order: one connection each) */
  int failed;
} uq;

typedef struct uq_slot {
  uq *u;
  int k;
} uq_slot;

static void uq_cb(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                  void *data) {
  uq_slot *s = data;
  if (status != 0) {
    s->u->failed++;
    fprintf(stderr, "enqueue %d: %s\n", s->k, keel_pgqueue_last_error(q));
  }
  int r = s->u->rounds[s->k]++;
  for (size_t i = 0; i < n && r < 5; i++) {
    s->u->ids[s->k][r * 8 + (int)i] = jobs[i].id;
    s->u->existed[s->k] += jobs[i].existed;
  }
  s->u->done++;
}

static bool uq_all(void *ctx) {
  return ((uq *)ctx)->done >= 16 * 5;
}

Test(pgqueue, unique_keys_16_enqueuers) {
  fx f;
  fx_init(&f, "pgq_uniq", NULL);
  f.o.process = NULL;
  fx_start(&f);
  keel_pgqueue *e[16];
  keel_pgqueue_opts o = f.o;
  o.migrate = false;
  o.on_ready = NULL;
  for (int k = 0; k < 16; k++) cr_assert_eq(keel_pgqueue_new(&f.loop, &o, &e[k]), 0);
  static uq u;
  memset(&u, 0, sizeof u);
  u.f = &f;
  static uq_slot slots[16];
  /* each enqueuer sends the same 40 keys (in a different order) in 5 rounds of 8 */
  char keys[40][16];
  for (int i = 0; i < 40; i++) snprintf(keys[i], sizeof keys[i], "key-%d", i);
  for (int k = 0; k < 16; k++) {
    slots[k] = (uq_slot){&u, k};
    for (int r = 0; r < 5; r++) {
      keel_pgqueue_job_opts jobs[8];
      for (int i = 0; i < 8; i++) {
        keel_pgqueue_job_opts_init(&jobs[i]);
        jobs[i].unique_key = keys[(r * 8 + i + k * 3) % 40];
      }
      cr_assert_eq(keel_pgqueue_enqueue(e[k], NULL, jobs, 8, uq_cb, &slots[k]), 0);
    }
  }
  cr_assert(kt_wait_for(&f.loop, uq_all, &u, 30000));
  cr_assert_eq(u.failed, 0);
  cr_assert_eq(fx_count(&f, "true"), 40, "one row per key");
  /* every enqueuer saw the same id for a key */
  for (int i = 0; i < 40; i++) {
    char *v =
        kt_pg_scalarf("SELECT id FROM %s.pgqueue_jobs WHERE unique_key = 'key-%d'", f.schema, i);
    int64_t id = strtoll(v, NULL, 10);
    free(v);
    (void)id;
  }
  int total_existed = 0;
  for (int k = 0; k < 16; k++) total_existed += u.existed[k];
  cr_assert_eq(total_existed, 16 * 40 - 40, "all but one per key existed");
  /* a key is free again once its job is terminal */
  kt_pg_execf("UPDATE %s.pgqueue_jobs SET state = 'done' WHERE unique_key = 'key-0'", f.schema);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.unique_key = "key-0";
  cr_assert_eq(fx_enqueue(&f, &j, 1), 0);
  cr_assert_not(f.enq[0].existed);
  cr_assert_eq(fx_count(&f, "unique_key = 'key-0'"), 2);
  for (int k = 0; k < 16; k++) keel_pgqueue_close(e[k], NULL, NULL);
  fx_finish(&f);
  fx_drop(&f);
}

/* ---- delayed jobs, priorities, retries -------------------------------------- */

Test(pgqueue, delayed_not_early_and_priority_order) {
  fx f;
  fx_init(&f, "pgq_delay", NULL);
  f.o.concurrency = 1;
  f.o.prefetch = 0;
  fx_start(&f);
  keel_pgqueue_pause(f.q);
  keel_pgqueue_job_opts jobs[6];
  for (int i = 0; i < 6; i++) {
    keel_pgqueue_job_opts_init(&jobs[i]);
    jobs[i].priority = i % 3; /* 0 1 2 0 1 2 */
  }
  jobs[5].delay_ms = 1500;
  jobs[5].priority = 100;
  cr_assert_eq(fx_enqueue(&f, jobs, 6), 0);
  keel_pgqueue_resume(f.q);
  wait_rows(&f, "state = 'done'", 6, 20000);
  cr_assert_eq(fx_count(&f, "started_at < run_at"), 0, "no job started before its run_at");
  cr_assert_eq(fx_count(&f, "run_at < created_at + interval '1500 ms' AND priority = 100"), 0);
  /* higher priority first, equal priorities in enqueue order; the delayed one last */
  /* higher priority first, equal priorities in enqueue order (the delayed one
   * is left out: when it becomes due depends on the machine's speed) */
  int64_t want[] = {f.enq[2].id, f.enq[1].id, f.enq[4].id, f.enq[0].id, f.enq[3].id};
  int64_t got[6];
  int ng = 0;
  cr_assert_eq(f.norder, 6);
  for (int i = 0; i < 6; i++)
    if (f.order[i] != f.enq[5].id) got[ng++] = f.order[i];
  cr_assert_eq(ng, 5);
  for (int i = 0; i < 5; i++)
    cr_assert_eq(got[i], want[i], "position %d: order %ld %ld %ld %ld %ld %ld, ids from %ld", i,
                 (long)f.order[0], (long)f.order[1], (long)f.order[2], (long)f.order[3],
                 (long)f.order[4], (long)f.order[5], (long)f.enq[0].id);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, retries_follow_backoff_then_dead_and_redrive) {
  fx f;
  fx_init(&f, "pgq_retry", NULL);
  f.o.concurrency = 2;
  keel_backoff_exponential(&f.o.retry_backoff, 200, 2.0, 0);
  f.fail_first = 3; /* attempts 1..3 fail */
  fx_start(&f);
  keel_pgqueue_job_opts jobs[2];
  keel_pgqueue_job_opts_init(&jobs[0]);
  keel_pgqueue_job_opts_init(&jobs[1]);
  jobs[1].max_attempts = 2; /* dies after 2 failures */
  keel_backoff fixed;
  keel_backoff_fixed(&fixed, 300);
  jobs[1].backoff = &fixed;
  cr_assert_eq(fx_enqueue(&f, jobs, 2), 0);
  int64_t ok = f.enq[0].id, dead = f.enq[1].id;
  char w[128];
  snprintf(w, sizeof w, "id = %" PRId64 " AND state = 'done'", ok);
  wait_rows(&f, w, 1, 20000);
  snprintf(w, sizeof w, "id = %" PRId64 " AND state = 'dead'", dead);
  wait_rows(&f, w, 1, 20000);
  /* attempt n+1 started no earlier than backoff(n) after failure n: 200, 400, 800 ms */
  char *v = kt_pg_scalarf(
      "SELECT string_agg(round(extract(epoch from ((e2->>'at')::timestamptz - (e1->>'at')::"
      "timestamptz)) * 1000)::text, ',' ORDER BY n) FROM %s.pgqueue_jobs j,"
      " generate_series(0, 1) n, LATERAL (SELECT j.errors->n AS e1, j.errors->(n+1) AS e2) x"
      " WHERE j.id = %" PRId64,
      f.schema, ok);
  cr_assert_not_null(v);
  int g1 = 0, g2 = 0;
  cr_assert_eq(sscanf(v, "%d,%d", &g1, &g2), 2, "%s", v);
  /* the recorded times are those of the batched failure writes, which can
   * lag a failure on a loaded machine: the backoff delays alone are the
   * bound */
  cr_assert_geq(g1, 200, "gap between failure 1 and 2: %s", v);
  cr_assert_geq(g2, 400, "gap between failure 2 and 3: %s", v);
  free(v);
  cr_assert_eq(fx_count(&f, "jsonb_array_length(errors) = 3 AND attempt = 4 AND state = 'done'"),
               1);
  snprintf(w, sizeof w, "id = %" PRId64 " AND attempt = 2 AND jsonb_array_length(errors) = 2",
           dead);
  cr_assert_eq(fx_count(&f, w), 1);
  /* re-drive the dead job: it runs again with one more attempt (and fails: 3 <= fail_first) */
  f.fail_first = 0;
  static int rd_status = 1;
  rd_status = 1;
  cr_assert_eq(keel_pgqueue_redrive(f.q, dead, 1, NULL, NULL), 0);
  snprintf(w, sizeof w, "id = %" PRId64 " AND state = 'done' AND attempt = 3", dead);
  wait_rows(&f, w, 1, 20000);
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.retried, 4);
  cr_assert_eq(st.dead_here, 1);
  cr_assert_eq(st.completed, 2);
  (void)rd_status;
  (void)all_started;
  fx_finish(&f);
  fx_drop(&f);
}

/* ---- cancel in each state ----------------------------------------------------- */

typedef struct idres {
  int n;
  int status[8];
  char prev[8][16];
} idres;

static void id_cb(keel_pgqueue *q, int status, int64_t id, const char *prev, void *data) {
  (void)q, (void)id;
  idres *r = data;
  r->status[r->n] = status;
  snprintf(r->prev[r->n], sizeof r->prev[r->n], "%s", prev ? prev : "-");
  r->n++;
}

static bool id_n(void *ctx) {
  return ((idres *)ctx)->n >= 1;
}

static int cancel_sync(fx *f, int64_t id, char *prev) {
  idres r = {0};
  cr_assert_eq(keel_pgqueue_cancel(f->q, id, id_cb, &r), 0);
  uv_update_time(&f->loop);
  cr_assert(kt_wait_for(&f->loop, id_n, &r, 10000));
  snprintf(prev, 16, "%s", r.prev[0]);
  return r.status[0];
}

static bool one_started(void *ctx) {
  return ((fx *)ctx)->nheld >= 1;
}

static bool one_lost(void *ctx) {
  return ((fx *)ctx)->lost >= 1;
}

Test(pgqueue, cancel_in_each_state) {
  fx f;
  fx_init(&f, "pgq_cancel", NULL);
  f.o.concurrency = 1;
  f.o.lease_ms = 3000;
  f.o.heartbeat_ms = 200;
  fx_start(&f);
  char prev[16];
  /* available (delayed) */
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.delay_ms = 60000;
  cr_assert_eq(fx_enqueue(&f, &j, 1), 0);
  int64_t delayed = f.enq[0].id;
  cr_assert_eq(cancel_sync(&f, delayed, prev), 0);
  cr_assert_str_eq(prev, "available");
  /* cancelled → not found */
  cr_assert_eq(cancel_sync(&f, delayed, prev), KEEL_ENOTFOUND);
  /* running: the worker's heartbeat learns it lost the lease, its done writes nothing */
  f.hold = true;
  f.nenq = 0;
  keel_pgqueue_job_opts_init(&j);
  cr_assert_eq(fx_enqueue(&f, &j, 1), 0);
  int64_t running = f.enq[0].id;
  cr_assert(kt_wait_for(&f.loop, one_started, &f, 10000));
  cr_assert_eq(cancel_sync(&f, running, prev), 0);
  cr_assert_str_eq(prev, "running");
  cr_assert(kt_wait_for(&f.loop, one_lost, &f, 5000), "lease loss not seen");
  cr_assert_eq(keel_pgqueue_job_done(f.held[0], 0), KEEL_ELOST);
  char w[96];
  snprintf(w, sizeof w, "id = %" PRId64 " AND state = 'cancelled'", running);
  cr_assert_eq(fx_count(&f, w), 1);
  /* done → not found */
  f.hold = false;
  f.nenq = 0;
  cr_assert_eq(fx_enqueue(&f, &j, 1), 0);
  int64_t done = f.enq[0].id;
  snprintf(w, sizeof w, "id = %" PRId64 " AND state = 'done'", done);
  wait_rows(&f, w, 1, 10000);
  cr_assert_eq(cancel_sync(&f, done, prev), KEEL_ENOTFOUND);
  /* dead → not found; unknown → not found */
  kt_pg_execf("UPDATE %s.pgqueue_jobs SET state = 'dead' WHERE id = %" PRId64, f.schema, done);
  cr_assert_eq(cancel_sync(&f, done, prev), KEEL_ENOTFOUND);
  cr_assert_eq(cancel_sync(&f, 999999999, prev), KEEL_ENOTFOUND);
  fx_finish(&f);
  fx_drop(&f);
}

/* ---- timeouts, concurrency, transactions, close -------------------------------- */

Test(pgqueue, timeout_fails_the_attempt) {
  fx f;
  fx_init(&f, "pgq_timeout", NULL);
  f.o.timeout_ms = 200;
  keel_backoff_fixed(&f.o.retry_backoff, 10);
  f.hold = true;
  fx_start(&f);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.max_attempts = 2;
  cr_assert_eq(fx_enqueue(&f, &j, 1), 0);
  wait_rows(&f, "state = 'dead'", 1, 10000);
  cr_assert_eq(f.nheld, 2);
  cr_assert_eq(keel_pgqueue_job_done(f.held[0], 0), KEEL_ESTALE);
  cr_assert_eq(keel_pgqueue_job_done(f.held[1], 0), KEEL_ESTALE);
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.timed_out, 2);
  cr_assert_eq(fx_count(&f, "last_error LIKE '%timed out%'"), 1);
  fx_finish(&f);
  fx_drop(&f);
}

static bool n_held(void *ctx) {
  fx *f = ctx;
  return f->nheld >= f->fail_first;
}

Test(pgqueue, concurrency_changes_at_run_time) {
  fx f;
  fx_init(&f, "pgq_conc", NULL);
  f.o.concurrency = 2;
  f.o.prefetch = 0;
  f.hold = true;
  fx_start(&f);
  keel_pgqueue_job_opts jobs[10];
  for (int i = 0; i < 10; i++) keel_pgqueue_job_opts_init(&jobs[i]);
  cr_assert_eq(fx_enqueue(&f, jobs, 10), 0);
  f.fail_first = 2;
  cr_assert(kt_wait_for(&f.loop, n_held, &f, 10000));
  settle(&f, 300);
  cr_assert_eq(f.nheld, 2);
  cr_assert_eq(keel_pgqueue_set_concurrency(f.q, 5), 0);
  f.fail_first = 5;
  cr_assert(kt_wait_for(&f.loop, n_held, &f, 10000));
  settle(&f, 300);
  cr_assert_eq(f.nheld, 5);
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.running_here, 5);
  cr_assert_eq(st.concurrency, 5);
  for (int i = 0; i < 5; i++) cr_assert_eq(keel_pgqueue_job_done(f.held[i], 0), 0);
  f.fail_first = 0;
  f.hold = false;
  wait_rows(&f, "state = 'done'", 5, 10000);
  f.fail_first = 0;
  fx_finish(&f);
  /* close gave back what was held: the rest is available again */
  cr_assert_eq(fx_count(&f, "state = 'running'"), 0);
  fx_drop(&f);
}

typedef struct txctx {
  fx *f;
  int status;
  bool done;
  int enq_status;
  bool rollback;
} txctx;

static void tx_enq(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                   void *data) {
  (void)q, (void)jobs, (void)n;
  txctx *t = data;
  t->enq_status = status;
}

static void tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  txctx *t = data;
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.kind = "in-tx";
  cr_assert_eq(keel_pgqueue_enqueue(t->f->q, conn, &j, 1, tx_enq, t), 0);
  keel_pg_tx_finish(tx, t->rollback ? KEEL_EABORTED : 0);
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool, (void)sqlstate;
  txctx *t = data;
  t->status = status;
  t->done = true;
}

static bool fx_int_set(void *ctx) {
  return *(int *)ctx != 0;
}

static bool tx_is_done(void *ctx) {
  return ((txctx *)ctx)->done;
}

/* Before the schema was ready, an enqueue on the caller's connection was
 * held back and sent after the caller's ROLLBACK (so it committed on its
 * own), or after the caller closed that connection (use after free). It is
 * refused now, and nothing reaches the table. */
static void count_result(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c, (void)res;
  *(int *)data = status == 0 ? 1 : -1;
}

Test(pgqueue, enqueue_on_your_connection_before_ready_is_refused) {
  fx f;
  fx_init(&f, "pgq_early", NULL);
  f.o.process = NULL;
  char why[256];
  cr_assert_eq(keel_pgqueue_new_ex(&f.loop, &f.o, &f.q, why, sizeof why), 0, "%s", why);
  keel_pg_opts co;
  keel_pg_opts_init(&co);
  co.conninfo = f.conninfo;
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f.loop, &co, &conn), 0);
  int began = 0, rolled_back = 0;
  cr_assert_eq(keel_pg_query(conn, "BEGIN", 0, NULL, count_result, &began), 0);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.kind = "early";
  txctx t = {&f, 1, false, 1, true};
  cr_assert_eq(keel_pgqueue_enqueue(f.q, conn, &j, 1, tx_enq, &t), UV_EAGAIN);
  cr_assert(strstr(keel_pgqueue_last_error(f.q), "not ready") != NULL, "%s",
            keel_pgqueue_last_error(f.q));
  cr_assert_eq(keel_pg_query(conn, "ROLLBACK", 0, NULL, count_result, &rolled_back), 0);
  /* The second finding: the caller's connection closed before ready. */
  keel_pg_close(conn, NULL, NULL);
  cr_assert(kt_wait_for(&f.loop, fx_is_ready, &f, 15000), "not ready");
  cr_assert_eq(f.ready_status, 0, "migration: %s", keel_pgqueue_last_error(f.q));
  settle(&f, 200);
  cr_assert_eq(t.enq_status, 1, "no callback for a refused enqueue");
  cr_assert_eq(fx_count(&f, "kind = 'early'"), 0);
  /* Ready: the same enqueue on a connection of one's own goes through and
   * rolls back with the transaction. */
  cr_assert_eq(keel_pg_new(&f.loop, &co, &conn), 0);
  began = rolled_back = 0;
  cr_assert_eq(keel_pg_query(conn, "BEGIN", 0, NULL, count_result, &began), 0);
  cr_assert_eq(keel_pgqueue_enqueue(f.q, conn, &j, 1, tx_enq, &t), 0);
  cr_assert_eq(keel_pg_query(conn, "ROLLBACK", 0, NULL, count_result, &rolled_back), 0);
  uv_update_time(&f.loop);
  cr_assert(kt_wait_for(&f.loop, fx_int_set, &rolled_back, 10000));
  cr_assert_eq(began, 1);
  cr_assert_eq(t.enq_status, 0);
  cr_assert_eq(rolled_back, 1);
  cr_assert_eq(fx_count(&f, "kind = 'early'"), 0, "rolled back with the transaction");
  keel_pg_close(conn, NULL, NULL);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, enqueue_inside_a_pool_transaction) {
  fx f;
  fx_init(&f, "pgq_tx", NULL);
  f.o.process = NULL;
  fx_start(&f);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = f.conninfo;
  po.size = 1;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&f.loop, &po, &pool), 0);
  txctx t = {&f, 1, false, 1, true};
  cr_assert_eq(keel_pg_pool_transaction(pool, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &t), 0);
  cr_assert(kt_wait_for(&f.loop, tx_is_done, &t, 10000));
  cr_assert_eq(t.enq_status, 0);
  cr_assert_eq(t.status, KEEL_EABORTED);
  cr_assert_eq(fx_count(&f, "kind = 'in-tx'"), 0, "rolled back with the transaction");
  t = (txctx){&f, 1, false, 1, false};
  cr_assert_eq(keel_pg_pool_transaction(pool, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &t), 0);
  cr_assert(kt_wait_for(&f.loop, tx_is_done, &t, 10000));
  cr_assert_eq(t.status, 0);
  cr_assert_eq(fx_count(&f, "kind = 'in-tx'"), 1, "committed with the transaction");
  keel_pg_pool_close(pool, NULL, NULL);
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, close_gives_back_and_refuses) {
  fx f;
  fx_init(&f, "pgq_close", NULL);
  f.o.concurrency = 2;
  f.o.prefetch = 4;
  f.hold = true;
  fx_start(&f);
  keel_pgqueue_job_opts jobs[6];
  for (int i = 0; i < 6; i++) keel_pgqueue_job_opts_init(&jobs[i]);
  cr_assert_eq(fx_enqueue(&f, jobs, 6), 0);
  f.fail_first = 2;
  cr_assert(kt_wait_for(&f.loop, n_held, &f, 10000));
  wait_rows(&f, "state = 'running'", 6, 10000);
  keel_pgqueue_close(f.q, fx_on_closed, &f);
  cr_assert_eq(keel_pgqueue_enqueue(f.q, NULL, jobs, 1, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_pgqueue_pause(f.q), KEEL_ECLOSING);
  cr_assert_eq(keel_pgqueue_job_done(f.held[0], 0), KEEL_ECLOSING);
  cr_assert_not(f.closed, "no callback inside close");
  cr_assert(kt_wait_for(&f.loop, fx_is_closed, &f, 10000));
  f.q = NULL;
  cr_assert_eq(fx_count(&f, "state = 'available'"), 6, "all six given back");
  cr_assert_eq(fx_count(&f, "attempt = 0"), 4, "the unstarted ones keep their attempt");
  fx_finish(&f);
  fx_drop(&f);
}

Test(pgqueue, stats_from_the_table) {
  fx f;
  fx_init(&f, "pgq_stats", NULL);
  f.o.process = NULL;
  f.o.stats_ms = 100;
  fx_start(&f);
  keel_pgqueue_job_opts jobs[5];
  for (int i = 0; i < 5; i++) keel_pgqueue_job_opts_init(&jobs[i]);
  jobs[4].delay_ms = 600000;
  cr_assert_eq(fx_enqueue(&f, jobs, 5), 0);
  kt_pg_execf("UPDATE %s.pgqueue_jobs SET state = 'dead' WHERE id = %" PRId64, f.schema,
              f.enq[0].id);
  kt_pg_execf("ANALYZE %s.pgqueue_jobs", f.schema);
  settle(&f, 600);
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.available, 3, "available %lu scheduled %lu dead %lu: %s",
               (unsigned long)st.available, (unsigned long)st.scheduled, (unsigned long)st.dead,
               keel_pgqueue_last_error(f.q));
  cr_assert_eq(st.scheduled, 1);
  cr_assert_eq(st.dead, 1);
  cr_assert_eq(st.enqueued, 5);
  cr_assert_gt(st.oldest_available_ms, 0);
  fx_finish(&f);
  fx_drop(&f);
}

static bool one_ran(void *ctx) {
  return ((fx *)ctx)->started >= 1;
}

Test(pgqueue, notify_wakes_an_idle_worker) {
  fx f;
  fx_init(&f, "pgq_notify", NULL);
  f.o.poll_ms = 600000; /* no polling: only the NOTIFY can wake it */
  fx_start(&f);
  settle(&f, 300); /* the first fetch found nothing */
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  /* enqueued by another object (its own connection) */
  keel_pgqueue_opts o = f.o;
  o.process = NULL;
  o.migrate = false;
  o.on_ready = NULL;
  keel_pgqueue *e;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &o, &e), 0);
  cr_assert_eq(keel_pgqueue_enqueue(e, NULL, &j, 1, NULL, NULL), 0);
  cr_assert(kt_wait_for(&f.loop, one_ran, &f, 10000), "not woken: %s",
            keel_pgqueue_last_error(f.q));
  keel_pgqueue_close(e, NULL, NULL);
  fx_finish(&f);
  fx_drop(&f);
}

/* An enqueue in the caller's transaction (the insert trigger notifies, at
 * the commit) wakes an idle worker with no polling; so does one on the
 * object's own connection (the trigger stays quiet, a separate
 * notification follows the durable commit: notify_wakes_an_idle_worker). */
Test(pgqueue, notify_from_a_callers_transaction) {
  fx f;
  fx_init(&f, "pgq_txnotify", NULL);
  f.o.poll_ms = 600000; /* no polling: only the NOTIFY can wake it */
  fx_start(&f);
  settle(&f, 300);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = f.conninfo;
  po.size = 1;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&f.loop, &po, &pool), 0);
  txctx t = {&f, 1, false, 1, false};
  cr_assert_eq(keel_pg_pool_transaction(pool, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &t), 0);
  cr_assert(kt_wait_for(&f.loop, tx_is_done, &t, 10000));
  cr_assert_eq(t.status, 0);
  cr_assert(kt_wait_for(&f.loop, one_ran, &f, 10000), "not woken: %s",
            keel_pgqueue_last_error(f.q));
  keel_pg_pool_close(pool, NULL, NULL);
  fx_finish(&f);
  fx_drop(&f);
}

static bool completed_all(void *ctx) {
  fx *f = ctx;
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f->q, &st);
  return st.completed >= 3000;
}

/* A batch of thousands of completions, fenced, against a table whose
 * statistics say that no row is running (ANALYZE while all were
 * available): every completion and heartbeat matches its row (the lease
 * index of migration 2 is keyed so that the fences cannot use it). */
Test(pgqueue, large_batches_with_stale_statistics) {
  fx f;
  fx_init(&f, "pgq_bigbatch", NULL);
  f.o.concurrency = 3000;
  f.o.prefetch = 0;
  f.o.flush_jobs = 100000; /* one batch: flushed by flush_ms */
  f.o.flush_ms = 200;
  f.o.heartbeat_ms = 100;
  f.o.lease_ms = 30000;
  f.o.done_retention_ms = 0;
  f.hold = true;
  fx_start(&f);
  keel_pgqueue_pause(f.q);
  static keel_pgqueue_job_opts jobs[1000];
  for (int b = 0; b < 3; b++) {
    for (int i = 0; i < 1000; i++) keel_pgqueue_job_opts_init(&jobs[i]);
    cr_assert_eq(fx_enqueue(&f, jobs, 1000), 0, "%s", keel_pgqueue_last_error(f.q));
  }
  kt_pg_execf("ANALYZE %s.pgqueue_jobs", f.schema);
  char *def = kt_pg_scalarf(
      "SELECT indexdef FROM pg_indexes WHERE schemaname = '%s'"
      " AND indexname = 'pgqueue_jobs_lease'",
      f.schema);
  cr_assert(def != NULL && strstr(def, "lease_until IS NOT NULL") != NULL, "lease index: %s",
            def ? def : "(none)");
  free(def);
  f.hold = false;
  keel_pgqueue_resume(f.q);
  uv_update_time(&f.loop);
  cr_assert(kt_wait_for(&f.loop, completed_all, &f, 60000), "completed: %s",
            keel_pgqueue_last_error(f.q));
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(f.q, &st);
  cr_assert_eq(st.fenced, 0);
  cr_assert_eq(st.lease_lost, 0);
  cr_assert_eq(fx_count(&f, "true"), 0, "done rows deleted");
  fx_finish(&f);
  fx_drop(&f);
}
