/* Durable queue across `pg_ctl restart -m immediate` on its own PostgreSQL
 * (initdb into a temporary directory, binaries from $KEEL_TEST_PG_BINDIR):
 * jobs are enqueued in batches, fetched and completed in batches while the
 * server is restarted three times; afterwards every job is done exactly
 * once (or dead) and none stays running. */
#include <libpq-fe.h>

#include "common.h"

#define N_JOBS 3000
#define BATCH 100
#define N_BATCHES (N_JOBS / BATCH)

typedef struct rs {
  fx f;
  PGconn *pc;
  char dir[128];
  int state[N_BATCHES]; /* 0 to send, 1 in flight, 2 acked, 3 to check and resend */
  int next;
  unsigned runs[N_JOBS];
  int enq_errors;
  uv_timer_t t;
} rs;

static rs R;

static void rs_process(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  (void)q, (void)data;
  const char *p = strstr(keel_pgqueue_job_payload(job), "\"i\":");
  long i = p ? strtol(p + 4, NULL, 10) : -1;
  if (i >= 0 && i < N_JOBS) R.runs[i]++;
  keel_pgqueue_job_done(job, 0);
}

static void rs_enq_cb(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                      void *data) {
  (void)q, (void)jobs, (void)n;
  int b = (int)(intptr_t)data;
  if (status == 0) {
    R.state[b] = 2;
  } else {
    R.enq_errors++;
    R.state[b] = 3; /* in doubt or not done: check what committed, send the rest */
  }
}

/* Blocking read of the keys of batch b that exist; returns -1 when the
 * server cannot be asked now. */
static int existing(int b, bool have[BATCH]) {
  if (PQstatus(R.pc) != CONNECTION_OK) PQreset(R.pc);
  if (PQstatus(R.pc) != CONNECTION_OK) return -1;
  char sql[256];
  snprintf(sql, sizeof sql,
           "SELECT substr(unique_key, 2)::int FROM %s.pgqueue_jobs WHERE unique_key LIKE 'k%%'"
           " AND substr(unique_key, 2)::int BETWEEN %d AND %d",
           R.f.schema, b * BATCH, b * BATCH + BATCH - 1);
  PGresult *r = PQexec(R.pc, sql);
  if (PQresultStatus(r) != PGRES_TUPLES_OK) {
    PQclear(r);
    return -1;
  }
  memset(have, 0, BATCH);
  for (int i = 0; i < PQntuples(r); i++) have[atoi(PQgetvalue(r, i, 0)) - b * BATCH] = true;
  PQclear(r);
  return 0;
}

static void send_batch(int b, const bool *skip) {
  static keel_pgqueue_job_opts jobs[BATCH];
  static char keys[BATCH][16], payloads[BATCH][32];
  size_t n = 0;
  for (int i = 0; i < BATCH; i++) {
    if (skip && skip[i]) continue;
    int k = b * BATCH + i;
    keel_pgqueue_job_opts_init(&jobs[n]);
    snprintf(keys[n], sizeof keys[n], "k%d", k);
    snprintf(payloads[n], sizeof payloads[n], "{\"i\":%d}", k);
    jobs[n].unique_key = keys[n];
    jobs[n].payload = payloads[n];
    n++;
  }
  if (n == 0) {
    R.state[b] = 2;
    return;
  }
  if (keel_pgqueue_enqueue(R.f.q, NULL, jobs, n, rs_enq_cb, (void *)(intptr_t)b) == 0)
    R.state[b] = 1;
}

static void rs_tick(uv_timer_t *t) {
  (void)t;
  for (int b = 0; b < N_BATCHES; b++)
    if (R.state[b] == 3) {
      bool have[BATCH];
      if (existing(b, have) == 0) send_batch(b, have);
      return;
    }
  if (R.next < N_BATCHES) send_batch(R.next++, NULL);
}

static bool all_acked(void *ctx) {
  (void)ctx;
  for (int b = 0; b < N_BATCHES; b++)
    if (R.state[b] != 2) return false;
  return true;
}

static long count(const char *where) {
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.pgqueue_jobs WHERE %s", R.f.schema, where);
  for (int i = 0; i < 100; i++) {
    if (PQstatus(R.pc) != CONNECTION_OK) PQreset(R.pc);
    PGresult *r = PQexec(R.pc, sql);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
      long n = atol(PQgetvalue(r, 0, 0));
      PQclear(r);
      return n;
    }
    PQclear(r);
    usleep(100000);
  }
  return -1;
}

static bool settled(void *ctx) {
  (void)ctx;
  static uint64_t last;
  static bool ok;
  uint64_t now = uv_now(&R.f.loop);
  if (ok || now - last < 200) return ok;
  last = now;
  ok = count("state IN ('available','running')") == 0;
  return ok;
}

static void restart(void) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "%s/scripts/pg-instance restart-immediate %s", KT_SRCROOT, R.dir);
  cr_assert_eq(system(cmd), 0, "restart failed");
  uv_update_time(&R.f.loop);
}

static bool one_in_flight(void *ctx) {
  (void)ctx;
  for (int b = 0; b < N_BATCHES; b++)
    if (R.state[b] == 1) return true;
  return false;
}

static bool never(void *ctx) {
  (void)ctx;
  return false;
}

static void run_ms(uint64_t ms) {
  uv_update_time(&R.f.loop);
  kt_wait_for(&R.f.loop, never, NULL, ms);
}

Test(pgqueue_restart, restart_immediate_during_fetch_completion_and_enqueue, .timeout = 600) {
  memset(&R, 0, sizeof R);
  snprintf(R.dir, sizeof R.dir, "/tmp/keel-pgq-restart.%d", (int)getpid());
  char cmd[512], info[256] = "";
  snprintf(cmd, sizeof cmd, "%s/scripts/pg-instance start %s", KT_SRCROOT, R.dir);
  FILE *p = popen(cmd, "r");
  cr_assert_not_null(p);
  cr_assert_not_null(fgets(info, sizeof info, p), "could not start a private PostgreSQL");
  pclose(p);
  info[strcspn(info, "\n")] = 0;
  fx_init(&R.f, "pgq_restart", info);
  R.f.o.process = rs_process;
  R.f.o.lease_ms = 1500;
  R.f.o.heartbeat_ms = 400;
  R.f.o.rescue_ms = 300;
  R.f.o.concurrency = 8;
  R.f.o.prefetch = 8;
  R.f.o.flush_ms = 20;
  R.f.o.flush_jobs = 64;
  fx_start(&R.f);
  R.pc = PQconnectdb(info);
  uv_timer_init(&R.f.loop, &R.t);
  uv_timer_start(&R.t, rs_tick, 60, 60);
  /* three restarts while batches are enqueued, fetched and completed */
  for (int i = 0; i < 3; i++) {
    run_ms(500);
    kt_wait_for(&R.f.loop, one_in_flight, NULL, 2000); /* an enqueue sent, not answered */
    restart();
  }
  cr_assert(kt_wait_for(&R.f.loop, all_acked, NULL, 120000), "enqueues never all acknowledged");
  if (!kt_wait_for(&R.f.loop, settled, NULL, 120000)) {
    keel_pgqueue_stats st;
    keel_pgqueue_get_stats(R.f.q, &st);
    cr_assert(false,
              "jobs left: available %ld running %ld done %ld; held %" PRIu64 " fetched %" PRIu64
              " completed %" PRIu64 " connected %d; last error: %s",
              count("state = 'available'"), count("state = 'running'"), count("state = 'done'"),
              st.held, st.fetched, st.completed, st.connected, keel_pgqueue_last_error(R.f.q));
  }
  uv_close((uv_handle_t *)&R.t, NULL);
  long done = count("state = 'done'"), dead = count("state = 'dead'"), all = count("true");
  long never_ran = 0, extra = 0;
  for (int i = 0; i < N_JOBS; i++) {
    if (R.runs[i] == 0)
      never_ran++;
    else
      extra += R.runs[i] - 1;
  }
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(R.f.q, &st);
  fprintf(stderr,
          "restart: done %ld dead %ld rows %ld never ran %ld extra runs %ld enqueue errors %d"
          " fenced %" PRIu64 " lease_lost %" PRIu64 " rescued %" PRIu64 "\n",
          done, dead, all, never_ran, extra, R.enq_errors, st.fenced, st.lease_lost, st.rescued);
  cr_assert_eq(all, N_JOBS, "one row per job: nothing lost, nothing enqueued twice");
  cr_assert_eq(done + dead, N_JOBS);
  cr_assert_eq(count("state = 'done' AND finished_at IS NULL"), 0);
  cr_assert_eq(never_ran, dead, "every done job ran");
  PQfinish(R.pc);
  fx_finish(&R.f);
  snprintf(cmd, sizeof cmd, "%s/scripts/pg-instance stop %s", KT_SRCROOT, R.dir);
  cr_expect_eq(system(cmd), 0);
}
