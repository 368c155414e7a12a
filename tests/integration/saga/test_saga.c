/* Sagas on the real PostgreSQL: the seed's scenario, compensation retries,
 * failed + on_stuck + re-drive, the late reply and its tombstone, two
 * processes resuming one saga, the callback contract. */
#include "common.h"

typedef struct poll_ctx {
  world *w;
  int want_started;
  bool done;
  uv_timer_t t;
} poll_ctx;

static void poll_tick(uv_timer_t *t) {
  poll_ctx *p = t->data;
  if (p->w->started >= p->want_started && world_open_count(p->w) == 0) {
    p->done = true;
    uv_timer_stop(t);
  }
}

/* Runs the loop until want sagas were started and none is open. */
static bool settle(world *w, int want, uint64_t timeout_ms) {
  poll_ctx p = {.w = w, .want_started = want};
  uv_timer_init(&w->loop, &p.t);
  p.t.data = &p;
  uv_timer_start(&p.t, poll_tick, 50, 50);
  bool ok = kt_run_until(&w->loop, &p.done, timeout_ms);
  uv_close((uv_handle_t *)&p.t, NULL);
  uv_run(&w->loop, UV_RUN_NOWAIT);
  return ok;
}

static long count_of(world *w, const char *fmt_where) {
  char *v = kt_pg_scalarf("SELECT count(*) FROM %s.effects WHERE %s", w->schema, fmt_where);
  long n = strtol(v, NULL, 10);
  free(v);
  return n;
}

static long scalar_l(const char *sql) {
  char *v = kt_pg_scalar(sql);
  long n = v ? strtol(v, NULL, 10) : -1;
  free(v);
  return n;
}

/* Insufficient funds: Release Item runs exactly once, the saga ends
 * compensated, the wallet is untouched. */
Test(saga, insufficient_funds_compensates_once, .timeout = 120) {
  world w;
  world_init(&w, "saga_if", 4, 10);
  world_opts(&w);
  world_start_objects(&w);
  world_start(&w, 1, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  cr_assert_eq(w.start_status, 0);
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "compensated");
  free(st);
  cr_assert_eq(count_of(&w, "kind = 'book'"), 1);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), 1, "Release Item must apply exactly once");
  cr_assert_eq(count_of(&w, "kind LIKE '%charge'"), 0);
  cr_assert_eq(w.c.releases_called, 1);
  char q[256];
  snprintf(q, sizeof q, "SELECT booked FROM %s.items WHERE id = 1", w.schema);
  cr_assert_eq(scalar_l(q), 0);
  snprintf(q, sizeof q, "SELECT balance FROM %s.wallets WHERE id = 1", w.schema);
  cr_assert_eq(scalar_l(q), 10);
  keel_saga_stats ss;
  keel_saga_get_stats(w.s, &ss);
  cr_assert_eq(ss.compensated, 1);
  cr_assert_eq(ss.started, 1);
  world_finish(&w);
}

/* A run by the durable queue completes its job in the statement of the
 * saga's last advance (docs/saga.md, Execution and recovery): when on_end
 * runs, the job's row is already gone. With the job's lease taken by
 * someone else just before that statement, the saga still ends (its version
 * guard passed) but the job's row is left to its owner: the queue counts a
 * fenced completion, and when that lease expires another delivery finds the
 * saga done and completes the job without calling anything again. */
static bool g_steal;
static long g_jobs_at_end = -1;
static void steal_hook(keel_saga *s, keel_saga_point p, int64_t id, unsigned step, bool comp,
                       unsigned attempt, void *data) {
  world *w = data;
  (void)s, (void)attempt;
  if (g_steal && p == KEEL_SAGA_BEFORE_COMMIT && step == 2 && !comp)
    kt_pg_execf(
        "UPDATE %s.pgqueue_jobs SET lease_owner = 'thief', lease_until = now() +"
        " interval '1 hour' WHERE queue = 'saga.order' AND payload->>'saga' = '%" PRId64 "'",
        w->schema, id);
}
static void jobs_end(keel_saga *s, int64_t id, keel_saga_state st, void *data) {
  world *w = data;
  char *v = kt_pg_scalarf(
      "SELECT count(*) FROM %s.pgqueue_jobs WHERE queue = 'saga.order' AND"
      " payload->>'saga' = '%" PRId64 "'",
      w->schema, id);
  g_jobs_at_end = v ? strtol(v, NULL, 10) : -1;
  free(v);
  w_end(s, id, st, data);
}

Test(saga, job_completed_by_last_advance, .timeout = 120) {
  world w;
  world_init(&w, "saga_jc", 4, 100);
  world_opts(&w);
  w.o.on_end = jobs_end;
  w.o.test_hook = steal_hook;
  w.o.lease_ms = 1000;
  world_start_objects(&w);
  world_start(&w, 1, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  cr_assert_eq(w.c.ended, 1);
  cr_assert_eq(g_jobs_at_end, 0, "the job's row must be deleted with the last advance");
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "done");
  free(st);
  /* the lease stolen before the last advance */
  g_steal = true;
  world_start(&w, 2, 40, 0);
  cr_assert(settle(&w, 2, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  g_steal = false;
  cr_assert_eq(w.c.ended, 2);
  cr_assert_eq(g_jobs_at_end, 1, "a job whose lease is someone else's is left to its owner");
  st = saga_state(&w, w.ids[1]);
  cr_assert_str_eq(st, "done");
  free(st);
  keel_saga_stats before, after;
  keel_saga_get_stats(w.s, &before);
  /* the thief's lease expires: the rescue makes the job available, a
   * delivery loads the saga, finds it done and completes the job */
  kt_pg_execf(
      "UPDATE %s.pgqueue_jobs SET lease_until = now() - interval '1 second'"
      " WHERE lease_owner = 'thief'",
      w.schema);
  long left = -1;
  for (int k = 0; k < 300 && left != 0; k++) {
    for (int i = 0; i < 10; i++) uv_run(&w.loop, UV_RUN_NOWAIT), usleep(5000);
    char *v =
        kt_pg_scalarf("SELECT count(*) FROM %s.pgqueue_jobs WHERE queue = 'saga.order'", w.schema);
    left = v ? strtol(v, NULL, 10) : -1;
    free(v);
  }
  cr_assert_eq(left, 0, "the saga's job was never completed");
  cr_assert_eq(w.c.ended, 2, "on_end once per saga");
  keel_saga_get_stats(w.s, &after);
  cr_assert_eq(after.actions, before.actions, "nothing called again");
  cr_assert_eq(after.done, 2);
  world_finish(&w);
}

/* Reserve Slot fails after the pivot: forward retries only, no refund. */
Test(saga, failure_after_pivot_retries_forward, .timeout = 120) {
  world w;
  world_init(&w, "saga_pp", 4, 100);
  world_opts(&w);
  w.c.fail_reserve = 4; /* more than max_attempts: a retriable step ignores it */
  world_start_objects(&w);
  world_start(&w, 2, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "done");
  free(st);
  cr_assert_eq(count_of(&w, "kind = 'charge'"), 1);
  cr_assert_eq(count_of(&w, "kind LIKE 'un%'"), 0, "no compensation after the pivot");
  cr_assert_eq(count_of(&w, "kind = 'reserve'"), 1);
  char q[256];
  snprintf(q, sizeof q,
           "SELECT count(*) FROM %s.saga_steps WHERE saga_id = %" PRId64
           " AND step = 2 AND phase = 'action'",
           w.schema, w.ids[0]);
  long na = scalar_l(q);
  cr_assert_eq(na, 5, "4 failures, then the success: %ld", na);
  snprintf(q, sizeof q, "SELECT balance FROM %s.wallets WHERE id = 2", w.schema);
  cr_assert_eq(scalar_l(q), 60);
  world_finish(&w);
}

/* A compensation failing 3 times then succeeding: compensated, 4 attempts. */
Test(saga, compensation_retries_then_succeeds, .timeout = 120) {
  world w;
  world_init(&w, "saga_cr", 4, 10);
  world_opts(&w);
  w.c.fail_release = 3;
  world_start_objects(&w);
  world_start(&w, 1, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "compensated");
  free(st);
  char q[256];
  snprintf(q, sizeof q,
           "SELECT count(*) FROM %s.saga_steps WHERE saga_id = %" PRId64
           " AND step = 0 AND phase = 'compensation'",
           w.schema, w.ids[0]);
  cr_assert_eq(scalar_l(q), 4);
  snprintf(q, sizeof q,
           "SELECT count(*) FROM %s.saga_steps WHERE saga_id = %" PRId64
           " AND phase = 'compensation' AND outcome = 'failed'",
           w.schema, w.ids[0]);
  cr_assert_eq(scalar_l(q), 3);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), 1);
  cr_assert_eq(w.c.stuck, 0);
  world_finish(&w);
}

static void on_redriven(keel_saga *s, int status, int64_t id, void *data) {
  (void)s, (void)id;
  int *out = data;
  *out = status == 0 ? 1 : status;
}

/* Failing forever: failed, on_stuck once, listed in the stats; a re-drive
 * after the participant is mended finishes it. */
Test(saga, compensation_failing_forever_then_redrive, .timeout = 120) {
  world w;
  world_init(&w, "saga_ff", 4, 10);
  world_opts(&w);
  w.steps[0].comp_attempts = 3;
  w.o.stats_ms = 100;
  w.c.fail_release = -1;
  world_start_objects(&w);
  world_start(&w, 1, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "failed");
  free(st);
  cr_assert_eq(w.c.stuck, 1);
  cr_assert_eq(w.c.stuck_id, w.ids[0]);
  /* the stats list it (table refresh every 100 ms) */
  keel_saga_stats ss;
  for (int i = 0; i < 100; i++) {
    keel_saga_get_stats(w.s, &ss);
    if (ss.stuck_ids[0] == w.ids[0]) break;
    uv_run(&w.loop, UV_RUN_ONCE); /* the stats timer wakes it */
  }
  cr_assert_eq(ss.stuck_ids[0], w.ids[0]);
  cr_assert_eq(ss.failed, 1);
  cr_assert_eq(ss.failed_now, 1);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), 0);
  /* mend the participant, re-drive */
  w.c.fail_release = 0;
  int rd = 0;
  cr_assert_eq(keel_saga_redrive(w.s, w.ids[0], on_redriven, &rd), 0);
  cr_assert_eq(rd, 0, "no callback inside the call");
  cr_assert(settle(&w, 1, 30000));
  while (rd == 0) uv_run(&w.loop, UV_RUN_ONCE);
  cr_assert_eq(rd, 1);
  /* settle may see the row before the job ran: wait for the end */
  for (int i = 0; i < 400; i++) {
    st = saga_state(&w, w.ids[0]);
    bool ok = strcmp(st, "compensated") == 0;
    free(st);
    if (ok) break;
    uv_run(&w.loop, UV_RUN_ONCE);
  }
  st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "compensated");
  free(st);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), 1);
  cr_assert_eq(w.c.stuck, 1, "on_stuck fires once");
  /* a second re-drive finds nothing to do */
  rd = 0;
  cr_assert_eq(keel_saga_redrive(w.s, w.ids[0], on_redriven, &rd), 0);
  while (rd == 0) uv_run(&w.loop, UV_RUN_ONCE);
  cr_assert_eq(rd, KEEL_ENOTFOUND);
  world_finish(&w);
}

/* The charge times out (its outcome unknown), the saga compensates, and
 * the charge arriving late at the wallet is refused by the tombstone the
 * refund left: the balance ends unchanged. */
Test(saga, late_reply_rejected_by_tombstone, .timeout = 120) {
  world w;
  world_init(&w, "saga_lr", 4, 100);
  world_opts(&w);
  w.steps[1].kind = KEEL_SAGA_COMPENSATABLE; /* compensatable charge (refund) */
  w.steps[1].compensation = s_refund;
  w.steps[1].timeout_ms = 200;
  w.steps[1].max_attempts = 1;
  /* The 200 ms also bounds each refund attempt: on a loaded machine some
   * time out, which is not what this test is about. */
  w.steps[1].comp_attempts = 100;
  w.steps[2].kind = KEEL_SAGA_RETRIABLE;
  w.c.hold_charge = true;
  world_start_objects(&w);
  world_start(&w, 3, 40, 0);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "compensated");
  free(st);
  cr_assert_not_null(w.c.held);
  /* the late reply: the orchestrator's handle is stale */
  cr_assert_eq(keel_saga_call_done(w.c.held, 0), KEEL_ESTALE);
  /* and the participant refuses the late request */
  char *r = kt_pg_scalarf("SELECT %s.act('%s', 'charge', 3, 40)", w.schema, w.c.held_key);
  cr_assert_str_eq(r, "tombstone");
  free(r);
  char q[256];
  snprintf(q, sizeof q, "SELECT balance FROM %s.wallets WHERE id = 3", w.schema);
  cr_assert_eq(scalar_l(q), 100);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), 1);
  keel_saga_stats ss;
  keel_saga_get_stats(w.s, &ss);
  cr_assert_geq(ss.timeouts, 1, "timeouts %" PRIu64, ss.timeouts);
  world_finish(&w);
}

/* A deadline: an overdue saga before its pivot compensates. */
Test(saga, deadline_moves_to_compensating, .timeout = 120) {
  world w;
  world_init(&w, "saga_dl", 4, 100);
  world_opts(&w);
  w.c.hold_charge = true; /* the pivot never answers: the deadline ends it */
  w.steps[1].kind = KEEL_SAGA_COMPENSATABLE;
  w.steps[1].compensation = s_refund;
  world_start_objects(&w);
  world_start(&w, 1, 40, 1500);
  cr_assert(settle(&w, 1, 30000), "saga did not settle: %s", keel_saga_last_error(w.s));
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "compensated");
  free(st);
  if (w.c.held) cr_assert_eq(keel_saga_call_done(w.c.held, 0), KEEL_ESTALE);
  /* The item was booked once and released once; or, on a loaded machine,
   * the deadline came before the booking ran: the release then left a
   * tombstone and undid nothing. */
  long booked = count_of(&w, "kind = 'book'");
  cr_assert_leq(booked, 1);
  cr_assert_eq(count_of(&w, "kind = 'unbook'"), booked);
  char q[256];
  snprintf(q, sizeof q, "SELECT sum(booked) FROM %s.items", w.schema);
  cr_assert_eq(scalar_l(q), 0, "the item is free again");
  world_finish(&w);
}

/* ---- two processes resume the same saga --------------------------------- */

typedef struct shm2 {
  volatile int at_record;
} shm2;
static shm2 *g_shm;

static void barrier_hook(keel_saga *s, keel_saga_point p, int64_t id, unsigned step, bool comp,
                         unsigned attempt, void *data) {
  (void)s, (void)id, (void)comp, (void)attempt, (void)data;
  if (p == KEEL_SAGA_BEFORE_RECORD && step == 0) {
    __atomic_add_fetch(&g_shm->at_record, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 2000 && __atomic_load_n(&g_shm->at_record, __ATOMIC_SEQ_CST) < 2; i++)
      usleep(5000);
  }
}

static void on_resumed(keel_saga *s, int status, int64_t id, void *data) {
  (void)s, (void)id;
  int *out = data;
  *out = status == 0 ? 1 : status;
}

static int resume_child(const char *schema, int64_t id) {
  world w;
  memset(&w, 0, sizeof w);
  uv_loop_init(&w.loop);
  snprintf(w.schema, sizeof w.schema, "%s", schema);
  world_opts(&w);
  w.o.orchestrate = false;
  w.o.test_hook = barrier_hook;
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 1;
  if (keel_pg_pool_new(&w.loop, &po, &w.pp) != 0) return 10;
  if (keel_saga_new(&w.loop, &w.o, &w.s) != 0) return 11;
  while (!w.ready) uv_run(&w.loop, UV_RUN_ONCE);
  int out = 0;
  if (keel_saga_resume(w.s, id, on_resumed, &out) != 0) return 12;
  while (out == 0) uv_run(&w.loop, UV_RUN_ONCE);
  keel_saga_close(w.s, NULL, NULL);
  keel_pg_pool_close(w.pp, NULL, NULL);
  uv_run(&w.loop, UV_RUN_DEFAULT);
  return out == 1 ? 0 : out == KEEL_ECONFLICT ? 1 : 13;
}

Test(saga, two_processes_resume_one_advances, .timeout = 120) {
  world w;
  world_init(&w, "saga_2p", 4, 100);
  world_opts(&w);
  w.o.orchestrate = false;
  world_start_objects(&w);
  world_start(&w, 1, 40, 0);
  while (w.started == 0) uv_run(&w.loop, UV_RUN_ONCE);
  cr_assert_eq(w.start_status, 0);
  world_finish(&w);
  g_shm = mmap(NULL, sizeof *g_shm, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  cr_assert_neq(g_shm, MAP_FAILED);
  g_shm->at_record = 0;
  pid_t p[2];
  for (int i = 0; i < 2; i++) {
    p[i] = fork();
    if (p[i] == 0) _exit(resume_child(w.schema, w.ids[0]));
  }
  int codes[2];
  for (int i = 0; i < 2; i++) {
    int stc;
    waitpid(p[i], &stc, 0);
    cr_assert(WIFEXITED(stc));
    codes[i] = WEXITSTATUS(stc);
  }
  cr_assert(g_shm->at_record >= 2, "both processes read the same version");
  cr_assert((codes[0] == 0 && codes[1] == 1) || (codes[0] == 1 && codes[1] == 0),
            "exactly one advances, the other gets a conflict: %d %d", codes[0], codes[1]);
  char *st = saga_state(&w, w.ids[0]);
  cr_assert_str_eq(st, "done");
  free(st);
  cr_assert_eq(count_of(&w, "kind = 'book'"), 1);
  /* the start recorded step 0's attempt 1; a resume cannot know whether a
   * job sent it, so the winner gave it its row (unknown) and ran attempt 2;
   * the loser recorded nothing */
  char q[256];
  snprintf(q, sizeof q,
           "SELECT string_agg(attempt || ':' || outcome, ',' ORDER BY attempt) FROM %s.saga_steps"
           " WHERE saga_id = %" PRId64 " AND step = 0",
           w.schema, w.ids[0]);
  char *rows = kt_pg_scalar(q);
  cr_assert(rows != NULL && strcmp(rows, "1:unknown,2:succeeded") == 0, "step 0 rows: %s",
            rows ? rows : "(null)");
  free(rows);
  munmap(g_shm, sizeof *g_shm);
}

/* ---- the callback contract ------------------------------------------------ */

typedef struct cc {
  world *w;
  int start_cb;
  int start_status;
  bool closed;
  int done_rc;
} cc;

static void cc_started(keel_saga *s, int status, int64_t id, bool existed, void *data) {
  (void)s, (void)id, (void)existed;
  cc *c = data;
  c->start_cb++;
  c->start_status = status;
}

static void cc_closed(void *obj, void *data) {
  (void)obj;
  cc *c = data;
  cr_assert_eq(c->start_cb, 1, "cancellations come before the close callback");
  c->closed = true;
}

static cc *g_cc;
static void close_in_action(keel_saga *s, keel_saga_call *call, void *data) {
  (void)data;
  keel_saga_close(s, cc_closed, g_cc);
  g_cc->done_rc = keel_saga_call_done(call, 0);
}

/* Close from inside a step callback; a start made before close gets
 * UV_ECANCELED or its outcome, before the close callback; a call after
 * close began gets KEEL_ECLOSING; the loop closes. */
Test(saga, close_from_callback, .timeout = 120) {
  world w;
  world_init(&w, "saga_cc", 4, 100);
  world_opts(&w);
  w.steps[0].action = close_in_action;
  cc c = {.w = &w};
  g_cc = &c;
  world_start_objects(&w);
  keel_saga_start_opts so;
  keel_saga_start_opts_init(&so);
  so.data = "{\"item\":1}";
  cr_assert_eq(keel_saga_start(w.s, &so, cc_started, &c), 0);
  cr_assert_eq(c.start_cb, 0, "no callback inside keel_saga_start");
  cr_assert(kt_run_until(&w.loop, &c.closed, 30000));
  cr_assert_eq(c.done_rc, KEEL_ECLOSING);
  cr_assert_eq(c.start_status, 0);
  w.s = NULL;
  /* the saga is still running in the log (the lease was given back) */
  char *st = kt_pg_scalarf("SELECT state FROM %s.saga_instances", w.schema);
  cr_assert_str_eq(st, "running");
  free(st);
  world_finish(&w);
}

Test(saga, calls_after_close_and_bad_input, .timeout = 60) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_saga_opts o;
  keel_saga_opts_init(&o);
  keel_saga_step st[2];
  keel_saga_step_init(&st[0], "a", s_book, s_release);
  keel_saga_step_init(&st[1], "b", s_book, s_release);
  o.conninfo = kt_pg_conninfo();
  o.type = "t";
  o.steps = st;
  o.nsteps = 2;
  keel_saga *s = (keel_saga *)0x1;
  char why[128];
  st[1].kind = KEEL_SAGA_PIVOT; /* a pivot with a compensation */
  cr_assert_eq(keel_saga_new_ex(&loop, &o, &s, why, sizeof why), UV_EINVAL);
  cr_assert_eq(s, (keel_saga *)0x1, "out untouched");
  st[1].compensation = NULL;
  st[0].kind = KEEL_SAGA_RETRIABLE;
  st[0].compensation = NULL;
  cr_assert_eq(keel_saga_new_ex(&loop, &o, &s, why, sizeof why), UV_EINVAL,
               "pivot after retriable");
  keel_saga_step_init(&st[0], "a b", s_book, s_release);
  cr_assert_eq(keel_saga_new_ex(&loop, &o, &s, why, sizeof why), UV_EINVAL);
  keel_saga_step_init(&st[0], "a", s_book, s_release);
  o.type = "bad type";
  cr_assert_eq(keel_saga_new(&loop, &o, &s), UV_EINVAL);
  o.type = "t";
  o.schema = "kt_saga_nothing";
  o.migrate = false;
  o.stats_ms = 0;
  cr_assert_eq(keel_saga_new(&loop, &o, &s), 0);
  keel_saga_close(s, NULL, NULL);
  cr_assert_eq(keel_saga_start(s, NULL, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_saga_redrive(s, 1, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_saga_resume(s, 1, NULL, NULL), KEEL_ECLOSING);
  keel_saga_close(s, NULL, NULL); /* a second call does nothing */
  kt_loop_finish(&loop);
  cr_assert_eq(keel_saga_redrive(NULL, 1, NULL, NULL), UV_EINVAL);
  cr_assert_str_eq(keel_saga_last_error(NULL), "saga is NULL");
}
