/*
 * bench/saga.c — three-step sagas whose steps are single-row updates in
 * PostgreSQL, 8 concurrent orchestrating workers in one process
 * (keel_saga concurrency 8), against the floor: the same three updates run
 * as plain statements by 8 concurrent workers with no saga (each worker
 * runs update 1, then 2, then 3, and starts again), on the same server in
 * the same run.
 *
 *   Each side first runs 200 sequences / sagas untimed (connections up,
 *   statements prepared on both sides), then:
 *   floor: KEEL_BENCH_SAGAS (default 3000) sequences of three updates;
 *   saga:  KEEL_BENCH_SAGAS sagas, started ahead (at most 64 waiting) so
 *          that the 8 workers never wait for a start; sagas/s from the
 *          first start to the last saga done.
 *   step_p99_ms: p99 of keel's own time per step (keel_saga_stats.added:
 *          from the previous step's outcome to the next callback, plus from
 *          done to the outcome's commit: what the log adds to a step).
 *
 * Last line: saga sagas_per_s=<x> floor_per_s=<y> ratio=<x/y> step_p99_ms=<z>
 * Env: KEEL_PG (scripts/bench sets it), KEEL_BENCH_SAGAS; KEEL_BENCH_SNAP (a
 * command run as `$KEEL_BENCH_SNAP <floor|saga> <begin|end>` right before and
 * after each measured phase, e.g. to read the server's CPU and statistics);
 * stderr gets the client's CPU per sequence / saga of each phase;
 * KEEL_BENCH_PHASES=floor or =saga runs only that phase (for measuring one
 * phase's cost from outside, e.g. the server's instructions under
 * callgrind; the last line then reports 0 for the other).
 */
#include <inttypes.h>
#include <stdio.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "keel/pg.h"
#include "keel/saga.h"

#define WORKERS 8
#define ROWS 1024

static uv_loop_t loop;

/* ---- per-phase CPU of this process, and the KEEL_BENCH_SNAP hook ------------ */

static double cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static double phase_cpu0;

static void phase(const char *name, bool begin, long n) {
  const char *snap = getenv("KEEL_BENCH_SNAP");
  if (!begin)
    fprintf(stderr, "%s: client CPU %.3f ms per %s\n", name,
            (cpu_s() - phase_cpu0) * 1e3 / (double)n, strcmp(name, "floor") ? "saga" : "sequence");
  if (snap && *snap) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s %s %s", snap, name, begin ? "begin" : "end");
    if (system(cmd) != 0) fprintf(stderr, "KEEL_BENCH_SNAP failed\n");
  }
  if (begin) phase_cpu0 = cpu_s();
}
static keel_pg_pool *pp;
static const char *conninfo;
static long total;
static long target; /* sequences or sagas of the part running: warm-up or measured */
#define WARMUP 200  /* untimed, before each measured part: connections up, statements prepared */

/* ---- participants: one single-row update per step ------------------------- */

static const char *const UPD[3] = {
    "UPDATE bench_saga.a SET v = v + 1 WHERE id = $1",
    "UPDATE bench_saga.b SET v = v + 1 WHERE id = $1",
    "UPDATE bench_saga.c SET v = v + 1 WHERE id = $1",
};

static void setup_sql(void) {
  char cmd[4096];
  snprintf(cmd, sizeof cmd,
           "psql -q -X -v ON_ERROR_STOP=1 \"%s\" -c \""
           "DROP SCHEMA IF EXISTS bench_saga CASCADE; CREATE SCHEMA bench_saga;"
           "CREATE TABLE bench_saga.a (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);"
           "CREATE TABLE bench_saga.b (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);"
           "CREATE TABLE bench_saga.c (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);"
           "INSERT INTO bench_saga.a SELECT g FROM generate_series(0, %d) g;"
           "INSERT INTO bench_saga.b SELECT g FROM generate_series(0, %d) g;"
           "INSERT INTO bench_saga.c SELECT g FROM generate_series(0, %d) g;\" >/dev/null",
           conninfo, ROWS, ROWS, ROWS);
  if (system(cmd) != 0) {
    fprintf(stderr, "setup failed (psql)\n");
    exit(1);
  }
}

/* ---- floor ------------------------------------------------------------------- */

typedef struct fworker {
  int step;
  long n;
  char id[16];
} fworker;

static long floor_started, floor_done;

static void floor_next(fworker *w);

static void floor_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  fworker *w = data;
  (void)c, (void)res;
  if (status != 0) {
    fprintf(stderr, "floor update failed: %s\n", keel_pg_pool_last_error(pp));
    exit(1);
  }
  if (++w->step == 3) {
    w->step = 0;
    floor_done++;
    if (floor_started >= target) return;
  }
  floor_next(w);
}

static void floor_next(fworker *w) {
  if (w->step == 0) {
    floor_started++;
    snprintf(w->id, sizeof w->id, "%ld", floor_started % ROWS);
  }
  const char *p[1] = {w->id};
  if (keel_pg_pool_query_cached(pp, UPD[w->step], 1, p, floor_cb, w) != 0) exit(1);
}

static double run_floor_part(long n) {
  fworker ws[WORKERS];
  memset(ws, 0, sizeof ws);
  floor_started = floor_done = 0;
  target = n;
  double t0 = bench_now_s();
  for (int i = 0; i < WORKERS; i++) floor_next(&ws[i]);
  while (floor_done < n) uv_run(&loop, UV_RUN_ONCE);
  return (double)floor_done / (bench_now_s() - t0);
}

static double run_floor(void) {
  (void)run_floor_part(WARMUP);
  phase("floor", true, total);
  double rate = run_floor_part(total);
  phase("floor", false, total);
  return rate;
}

/* ---- saga ------------------------------------------------------------------- */

static keel_saga *sg;
static bool ready;
static long started, ended, in_flight;
static double t_first;
static uint64_t running_sum; /* sagas running here, summed at each end */

typedef struct sop {
  keel_saga_call *call;
  char id[16];
} sop;

static void step_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_saga_call *call = data;
  (void)c, (void)res;
  keel_saga_call_done(call, status);
}

static void step_fn(keel_saga *s, keel_saga_call *call, void *data) {
  (void)s, (void)data;
  char id[16];
  snprintf(id, sizeof id, "%d", (int)(keel_saga_call_saga_id(call) % ROWS));
  const char *p[1] = {id};
  if (keel_pg_pool_query_cached(pp, UPD[keel_saga_call_step(call)], 1, p, step_cb, call) != 0)
    keel_saga_call_done(call, KEEL_ECONN);
}

static void comp_fn(keel_saga *s, keel_saga_call *call, void *data) {
  (void)s, (void)data;
  keel_saga_call_done(call, 0); /* never needed here */
}

static void on_ready(keel_saga *s, int status, void *data) {
  (void)data;
  if (status != 0) {
    fprintf(stderr, "saga not ready: %s\n", keel_saga_last_error(s));
    exit(1);
  }
  ready = true;
}

static void start_more(void);

static void on_started(keel_saga *s, int status, int64_t id, bool existed, void *data) {
  (void)id, (void)existed, (void)data;
  if (status != 0) {
    fprintf(stderr, "start failed: %s\n", keel_saga_last_error(s));
    exit(1);
  }
}

static void on_end(keel_saga *s, int64_t id, keel_saga_state st, void *data) {
  (void)s, (void)id, (void)data;
  if (st != KEEL_SAGA_DONE) {
    fprintf(stderr, "saga ended %s\n", keel_saga_state_name(st));
    exit(1);
  }
  ended++;
  in_flight--;
  keel_saga_stats ss;
  keel_saga_get_stats(s, &ss);
  running_sum += ss.running_here;
  start_more();
}

static void start_more(void) {
  while (started < target && in_flight < 64) {
    if (started == 0) t_first = bench_now_s();
    started++;
    in_flight++;
    if (keel_saga_start(sg, NULL, on_started, NULL) != 0) {
      fprintf(stderr, "start refused: %s\n", keel_saga_last_error(sg));
      exit(1);
    }
  }
}

static double run_saga(double *p99) {
  keel_saga_step st[3];
  keel_saga_step_init(&st[0], "a", step_fn, comp_fn);
  keel_saga_step_init(&st[1], "b", step_fn, comp_fn);
  keel_saga_step_init(&st[2], "c", step_fn, comp_fn);
  keel_saga_opts o;
  keel_saga_opts_init(&o);
  o.conninfo = conninfo;
  o.schema = "bench_saga";
  o.type = "bench";
  o.steps = st;
  o.nsteps = 3;
  o.concurrency = WORKERS;
  o.on_ready = on_ready;
  o.on_end = on_end;
  o.stats_ms = 0;
  if (keel_saga_new(&loop, &o, &sg) != 0) exit(1);
  while (!ready) uv_run(&loop, UV_RUN_ONCE);
  target = WARMUP;
  start_more();
  while (ended < WARMUP) uv_run(&loop, UV_RUN_ONCE);
  started = ended = 0;
  running_sum = 0;
  target = total;
  phase("saga", true, total);
  start_more();
  while (ended < total) uv_run(&loop, UV_RUN_ONCE);
  double rate = (double)ended / (bench_now_s() - t_first);
  phase("saga", false, total);
  keel_saga_stats ss;
  keel_saga_get_stats(sg, &ss);
  *p99 = ss.added.p99_ms;
  fprintf(stderr, "saga: %.1f sagas running on average (of %d workers)\n",
          (double)running_sum / (double)ended, WORKERS);
  fprintf(stderr, "saga: step p50 %.2f ms p99 %.2f ms; added p50 %.2f ms p99 %.2f ms\n",
          ss.step.p50_ms, ss.step.p99_ms, ss.added.p50_ms, ss.added.p99_ms);
  keel_saga_close(sg, NULL, NULL);
  return rate;
}

int main(void) {
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || *conninfo == '\0') {
    fprintf(stderr, "KEEL_PG is not set (run ./scripts/bench saga)\n");
    return 1;
  }
  total = getenv("KEEL_BENCH_SAGAS") ? atol(getenv("KEEL_BENCH_SAGAS")) : 3000;
  if (total < 10) total = 10;
  setup_sql();
  uv_loop_init(&loop);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = WORKERS;
  if (keel_pg_pool_new(&loop, &po, &pp) != 0) return 1;
  const char *phases = getenv("KEEL_BENCH_PHASES");
  bool do_floor = phases == NULL || strcmp(phases, "saga") != 0;
  bool do_saga = phases == NULL || strcmp(phases, "floor") != 0;
  double floor_rate = do_floor ? run_floor() : 0;
  fprintf(stderr, "floor: %.0f sequences/s\n", floor_rate);
  double p99 = 0;
  double saga_rate = do_saga ? run_saga(&p99) : 0;
  keel_pg_pool_close(pp, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  printf("saga sagas_per_s=%.0f floor_per_s=%.0f ratio=%.3f step_p99_ms=%.2f\n", saga_rate,
         floor_rate, floor_rate > 0 ? saga_rate / floor_rate : 0, p99);
  return 0;
}
