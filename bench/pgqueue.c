/*
 * bench/pgqueue.c — the durable queue on a PostgreSQL with stock durability
 * (fsync and synchronous_commit on: its own server, started here with
 * scripts/pg-instance, not the throwaway one of the scripts).
 *
 *   1. enqueue: KEEL_BENCH_JOBS (100,000) no-op jobs in batches of 1,000;
 *   2. work: 4 forked processes x concurrency 16 drain them; jobs/s from
 *      the first fetch to the last completion written;
 *   3. pickup: jobs enqueued one by one (autocommit, spread over 4
 *      connections as 4 application processes would) into an idle queue
 *      at 200/s for 5 s, each carrying its enqueue time; latency = start of
 *      the process callback - the enqueue call (same machine clock; it
 *      includes the enqueue's durable commit);
 *   4. a checker: lost = jobs never executed or left in the table,
 *      dup = executions beyond one per job (shared memory counters).
 *
 * Last line: pgqueue jobs_per_s=<x> enqueue_per_s=<y> pickup_p50_ms=<z>
 *            pickup_p99_ms=<w> lost=<v> dup=<u>
 * Env: KEEL_BENCH_JOBS, KEEL_BENCH_WORKERS (4), KEEL_BENCH_CONCURRENCY (16),
 *      KEEL_BENCH_PREFETCH (local prefetch per worker, default 1024),
 *      KEEL_BENCH_PG (use this server instead of starting one).
 */
#include <inttypes.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "keel/pgqueue.h"
#include "pgqueue/pgqueue_internal.h" /* keel__pgq_job_trace */

enum { PICKUP_MAX = 4096, PK_SEND = 0, PK_ACK, PK_NOTIFY, PK_SENT, PK_FETCHED, PK_START };

typedef struct shared {
  atomic_int ready;
  atomic_int go;
  atomic_int stop;
  atomic_uint_fast64_t completed;
  atomic_uint_fast64_t first_fetch_ns;
  atomic_uint_fast64_t pickup_n;
  uint64_t pickup_ns[4096];
  /* per pickup job (index i of its payload), wall clock ns: the enqueue
   * call, its callback (commit acknowledged), the NOTIFY the worker's keel
   * had received when it sent the fetch that returned the job, that fetch
   * sent, its answer, the process callback */
  uint64_t pk[PICKUP_MAX][6];
  atomic_uchar runs[]; /* executions per job (index = id - id0) */
} shared;

static shared *sh;
static int64_t id0;
static long njobs;
static const char *conninfo;

static uint64_t real_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU seconds used by a process ($1 = pid): user + system, with its reaped
 * children when all is set; -1 when unreadable. */
static double proc_cpu_s(long pid, bool all) {
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  FILE *f = fopen(path, "r");
  if (f == NULL) return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = 0;
  const char *p = strrchr(buf, ')');
  if (p == NULL) return -1;
  /* fields after ')': 3 state ... 14 utime 15 stime 16 cutime 17 cstime */
  unsigned long long v[18] = {0};
  int field = 2;
  for (p++; *p && field < 17;) {
    while (*p == ' ') p++;
    field++;
    v[field] = strtoull(p, (char **)&p, 10);
    if (*p && *p != ' ')
      while (*p && *p != ' ') p++;
  }
  double t = (double)(v[14] + v[15] + (all ? v[16] + v[17] : 0));
  return t / (double)sysconf(_SC_CLK_TCK);
}

/* CPU seconds of a PostgreSQL instance (postmaster, its live children and
 * the reaped ones); -1 when not readable (another user's server, no /proc). */
static double server_cpu_s(const char *datadir) {
  if (datadir == NULL || !*datadir) return -1;
  char path[512];
  snprintf(path, sizeof path, "%s/postmaster.pid", datadir);
  FILE *f = fopen(path, "r");
  long pm = 0;
  if (f == NULL || fscanf(f, "%ld", &pm) != 1) {
    if (f) fclose(f);
    return -1;
  }
  fclose(f);
  double t = proc_cpu_s(pm, true);
  if (t < 0) return -1;
  snprintf(path, sizeof path, "/proc/%ld/task/%ld/children", pm, pm);
  f = fopen(path, "r");
  long c;
  while (f != NULL && fscanf(f, "%ld", &c) == 1) {
    double x = proc_cpu_s(c, true);
    if (x > 0) t += x;
  }
  if (f) fclose(f);
  return t;
}

static double self_children_cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_CHILDREN, &ru);
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int env_int(const char *name, int def) {
  const char *v = getenv(name);
  return v && *v ? (int)strtol(v, NULL, 10) : def;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

/* p50 and p99 (ms) of a signed sample (sorted in place). */
static void pct_ms(int64_t *v, int n, double *p50, double *p99) {
  *p50 = *p99 = 0;
  if (n <= 0) return;
  qsort(v, (size_t)n, sizeof *v, cmp_i64);
  *p50 = (double)v[n / 2] / 1e6;
  *p99 = (double)v[(int)(n * 0.99)] / 1e6;
}

/* Where the pickup time goes, for the jobs whose six instants are known:
 * cumulative from the enqueue call (p50/p99) and per segment. A job whose
 * fetch was sent before its own NOTIFY arrived (woken by an earlier one, or
 * by the poll) counts in "not woken by its NOTIFY"; its notify segments
 * are left out. */
static void print_pickup_split(long n, const char *fsync_note) {
  static int64_t v[PICKUP_MAX];
  static const char *const cum_name[] = {"",           "commit acknowledged", "NOTIFY received",
                                         "fetch sent", "claim returned",      "job start"};
  char out[1024];
  size_t o = 0;
  int m = 0;
  if (n > PICKUP_MAX) n = PICKUP_MAX;
  o += (size_t)snprintf(out + o, sizeof out - o,
                        "pickup split (ms after the enqueue call, p50/p99):");
  for (int k = PK_ACK; k <= PK_START; k++) {
    m = 0;
    for (long i = 0; i < n; i++) {
      uint64_t *t = sh->pk[i];
      if (!t[PK_SEND] || !t[PK_ACK] || !t[PK_START] || !t[PK_FETCHED]) continue;
      if (k == PK_NOTIFY && t[PK_NOTIFY] < t[PK_SEND]) continue;
      v[m++] = (int64_t)(t[k] - t[PK_SEND]);
    }
    double a, b;
    pct_ms(v, m, &a, &b);
    o += (size_t)snprintf(out + o, sizeof out - o, "%s %s %.2f/%.2f", k == PK_ACK ? "" : ",",
                          cum_name[k], a, b);
  }
  static const struct {
    const char *name;
    int from, to;
    bool notify;
  } seg[] = {{"commit", PK_SEND, PK_ACK, false},
             {"ack->NOTIFY", PK_ACK, PK_NOTIFY, true},
             {"NOTIFY->fetch", PK_NOTIFY, PK_SENT, true},
             {"claim round trip", PK_SENT, PK_FETCHED, false},
             {"dispatch", PK_FETCHED, PK_START, false}};
  int all = 0, other = 0;
  for (long i = 0; i < n; i++) {
    uint64_t *t = sh->pk[i];
    if (!t[PK_SEND] || !t[PK_ACK] || !t[PK_START] || !t[PK_FETCHED]) continue;
    all++;
    if (t[PK_NOTIFY] < t[PK_SEND]) other++;
  }
  o += (size_t)snprintf(out + o, sizeof out - o, "; segments:");
  for (size_t k = 0; k < sizeof seg / sizeof seg[0] && o < sizeof out; k++) {
    m = 0;
    for (long i = 0; i < n; i++) {
      uint64_t *t = sh->pk[i];
      if (!t[PK_SEND] || !t[PK_ACK] || !t[PK_START] || !t[PK_FETCHED]) continue;
      if (seg[k].notify && t[PK_NOTIFY] < t[PK_SEND]) continue;
      v[m++] = (int64_t)(t[seg[k].to] - t[seg[k].from]);
    }
    double a, b;
    pct_ms(v, m, &a, &b);
    o += (size_t)snprintf(out + o, sizeof out - o, "%s %s %.2f/%.2f", k ? "," : "", seg[k].name, a,
                          b);
  }
  if (o < sizeof out)
    snprintf(out + o, sizeof out - o, "; %d jobs, %d not woken by their own NOTIFY", all, other);
  printf("%s; %s\n", out, fsync_note);
}

/* This disk's durable write: 8 kB + fdatasync() once per 5 ms (the pickup
 * phase's rate), 200 times, in dir (the server's filesystem). */
static void fsync_probe(const char *dir, char *note, size_t cap) {
  char path[512];
  snprintf(path, sizeof path, "%s/fsync-probe", dir);
  FILE *f = fopen(path, "w+");
  static uint64_t lat[200];
  static char block[8192];
  int n = 0;
  snprintf(note, cap, "disk fdatasync: not measured");
  if (f == NULL) return;
  memset(block, 'x', sizeof block);
  int fd = fileno(f);
  for (int i = 0; i < 200; i++) {
    if (pwrite(fd, block, sizeof block, (off_t)(i % 16) * 8192) != (ssize_t)sizeof block) break;
    uint64_t t = bench_mono_ns();
    if (fdatasync(fd) != 0) break;
    lat[n++] = bench_mono_ns() - t;
    usleep(5000);
  }
  fclose(f);
  remove(path);
  double p50, p99;
  bench_percentiles_us(lat, n, &p50, &p99);
  snprintf(note, cap, "disk fdatasync 8 kB at 200/s: p50 %.2f ms, p99 %.2f ms", p50 / 1000,
           p99 / 1000);
}

/* ---- worker process ------------------------------------------------------------ */

typedef struct worker {
  uv_loop_t loop;
  keel_pgqueue *q;
  uv_timer_t tick;
  bool pickup;
  bool started;
} worker;

static void w_process(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  worker *w = data;
  (void)q;
  if (w->pickup) {
    const char *p = keel_pgqueue_job_payload(job);
    const char *t = strstr(p, "\"t\":");
    const char *ix = strstr(p, "\"i\":");
    if (t) {
      uint64_t now = real_ns();
      uint64_t sent = strtoull(t + 4, NULL, 10);
      uint64_t n = atomic_fetch_add(&sh->pickup_n, 1);
      if (n < 4096) sh->pickup_ns[n] = now - sent;
      long i = ix ? strtol(ix + 4, NULL, 10) : -1;
      if (i >= 0 && i < PICKUP_MAX) {
        keel__pgq_job_trace(job, &sh->pk[i][PK_NOTIFY], &sh->pk[i][PK_SENT],
                            &sh->pk[i][PK_FETCHED]);
        sh->pk[i][PK_START] = now;
      }
    }
  } else {
    int64_t i = keel_pgqueue_job_id(job) - id0;
    if (i >= 0 && i < njobs) atomic_fetch_add(&sh->runs[i], 1);
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&sh->first_fetch_ns, &zero, bench_mono_ns());
  }
  keel_pgqueue_job_done(job, 0);
}

static uint64_t last_completed;

static void w_tick(uv_timer_t *t) {
  worker *w = t->data;
  if (!w->started && atomic_load(&sh->go)) {
    w->started = true;
    keel_pgqueue_resume(w->q);
  }
  keel_pgqueue_stats st;
  keel_pgqueue_get_stats(w->q, &st);
  if (st.completed > last_completed) {
    atomic_fetch_add(&sh->completed, st.completed - last_completed);
    last_completed = st.completed;
  }
  if (atomic_load(&sh->stop)) {
    fprintf(stderr,
            "worker %d: fetches %" PRIu64 " fetched %" PRIu64 " completed %" PRIu64
            " flushes %" PRIu64 " fenced %" PRIu64 " lost %" PRIu64 " back %" PRIu64
            " rescued %" PRIu64
            " fetch p50 %.1f ms p99 %.1f ms pickup (server clock) p50 %.1f ms"
            " p99 %.1f ms; last error: %s\n",
            (int)getpid(), st.fetches, st.fetched, st.completed, st.flushes, st.fenced,
            st.lease_lost, st.given_back, st.rescued, st.fetch.p50_ms, st.fetch.p99_ms,
            st.pickup.p50_ms, st.pickup.p99_ms, keel_pgqueue_last_error(w->q));
    keel_pgqueue_close(w->q, NULL, NULL);
    uv_close((uv_handle_t *)t, NULL);
  }
}

static void w_ready(keel_pgqueue *q, int status, void *data) {
  (void)q, (void)data;
  if (status == 0) atomic_fetch_add(&sh->ready, 1);
}

static int run_worker(const char *queue, bool pickup) {
  worker w = {0};
  w.pickup = pickup;
  uv_loop_init(&w.loop);
  keel_pgqueue_opts o;
  keel_pgqueue_opts_init(&o);
  o.conninfo = conninfo;
  o.queue = queue;
  o.process = w_process;
  o.on_ready = w_ready;
  o.data = &w;
  o.concurrency = (unsigned)env_int("KEEL_BENCH_CONCURRENCY", 16);
  o.prefetch = (unsigned)env_int("KEEL_BENCH_PREFETCH", 1024);
  o.flush_jobs = (unsigned)env_int("KEEL_BENCH_FLUSH_JOBS", 4096);
  o.flush_ms = 1;
  o.stats_ms = 0;
  o.migrate = false;
  if (keel_pgqueue_new(&w.loop, &o, &w.q) != 0) return 1;
  if (!pickup)
    keel_pgqueue_pause(w.q);
  else
    w.started = true;
  uv_timer_init(&w.loop, &w.tick);
  w.tick.data = &w;
  uv_timer_start(&w.tick, w_tick, 1, 1);
  uv_run(&w.loop, UV_RUN_DEFAULT);
  return uv_loop_close(&w.loop) == 0 ? 0 : 1;
}

/* ---- parent: enqueue ------------------------------------------------------------- */

typedef struct enq {
  uv_loop_t loop;
  keel_pgqueue *q;
  keel_pgqueue *pq[4]; /* one-by-one enqueues: 4 connections, as 4 app processes would */
  unsigned rr;
  long sent, acked;
  int inflight;
  int failed;
  bool ready;
  int64_t min_id;
  uv_timer_t timer;
  long pickup_left;
  uint64_t ack_ns[4096]; /* enqueue call -> its callback (the durable commit) */
  int nack;
  long pick_i;
} enq;

typedef struct pick_req {
  enq *e;
  uint64_t sent;
  long i;
} pick_req;

static void on_ready(keel_pgqueue *q, int status, void *data) {
  enq *e = data;
  if (status != 0) fprintf(stderr, "migration: %s\n", keel_pgqueue_last_error(q));
  e->ready = true;
}

static void send_batches(enq *e);

static void on_enq(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                   void *data) {
  enq *e = data;
  e->inflight--;
  if (status != 0) {
    fprintf(stderr, "enqueue: %s\n", keel_pgqueue_last_error(q));
    e->failed++;
  }
  for (size_t i = 0; i < n; i++)
    if (e->min_id == 0 || jobs[i].id < e->min_id) e->min_id = jobs[i].id;
  e->acked += (long)n;
  send_batches(e);
}

static void send_batches(enq *e) {
  static keel_pgqueue_job_opts jobs[1000];
  static char payloads[1000][32];
  while (e->inflight < 4 && e->sent < njobs) {
    long n = njobs - e->sent < 1000 ? njobs - e->sent : 1000;
    for (long i = 0; i < n; i++) {
      keel_pgqueue_job_opts_init(&jobs[i]);
      snprintf(payloads[i], sizeof payloads[i], "{\"n\":%ld}", e->sent + i);
      jobs[i].payload = payloads[i];
      jobs[i].kind = "noop";
    }
    if (keel_pgqueue_enqueue(e->q, NULL, jobs, (size_t)n, on_enq, e) != 0) {
      fprintf(stderr, "enqueue refused: %s\n", keel_pgqueue_last_error(e->q));
      e->failed++;
      return;
    }
    e->sent += n;
    e->inflight++;
  }
}

static void on_pickup_enq(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                          void *data) {
  (void)jobs, (void)n;
  pick_req *r = data;
  enq *e = r->e;
  uint64_t now = real_ns();
  if (e->nack < 4096) e->ack_ns[e->nack++] = now - r->sent;
  if (r->i >= 0 && r->i < PICKUP_MAX) sh->pk[r->i][PK_ACK] = now;
  free(r);
  e->inflight--;
  if (status != 0) fprintf(stderr, "pickup enqueue: %s\n", keel_pgqueue_last_error(q));
}

static void pickup_tick(uv_timer_t *t) {
  enq *e = t->data;
  if (e->pickup_left-- <= 0) {
    uv_timer_stop(t);
    return;
  }
  char payload[80];
  long i = e->pick_i++;
  uint64_t t0 = real_ns();
  if (i < PICKUP_MAX) sh->pk[i][PK_SEND] = t0;
  snprintf(payload, sizeof payload, "{\"t\":%" PRIu64 ",\"i\":%ld}", t0, i);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  j.queue = "pickup";
  j.payload = payload;
  keel_pgqueue *q = e->pq[e->rr++ % 4];
  pick_req *r = malloc(sizeof *r);
  if (r == NULL) return;
  r->e = e;
  r->i = i;
  r->sent = t0;
  if (keel_pgqueue_enqueue(q, NULL, &j, 1, on_pickup_enq, r) == 0)
    e->inflight++;
  else
    free(r);
}

static bool run_until(uv_loop_t *loop, bool (*cond)(void *), void *ctx, double seconds) {
  double end = bench_now_s() + seconds;
  while (!cond(ctx) && bench_now_s() < end) uv_run(loop, UV_RUN_NOWAIT), usleep(200);
  return cond(ctx);
}

static bool e_ready(void *ctx) {
  return ((enq *)ctx)->ready;
}
static bool e_acked(void *ctx) {
  enq *e = ctx;
  return e->acked >= njobs || e->failed;
}
static bool e_idle(void *ctx) {
  enq *e = ctx;
  return e->pickup_left <= 0 && e->inflight == 0;
}

static char *scalar(PGconn *c, const char *sql) {
  PGresult *r = PQexec(c, sql);
  char *v = NULL;
  if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) > 0)
    v = strdup(PQgetvalue(r, 0, 0));
  else
    fprintf(stderr, "%s: %s\n", sql, PQerrorMessage(c));
  PQclear(r);
  return v;
}

int main(void) {
  njobs = env_int("KEEL_BENCH_JOBS", 100000);
  int nworkers = env_int("KEEL_BENCH_WORKERS", 4);
  char dir[] = "/tmp/keel-bench-pgq.XXXXXX";
  static char info[256];
  conninfo = getenv("KEEL_BENCH_PG");
  if (conninfo == NULL || !*conninfo) {
    if (mkdtemp(dir) == NULL) return 1;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "scripts/pg-instance start %s", dir);
    FILE *p = popen(cmd, "r");
    if (p == NULL || fgets(info, sizeof info, p) == NULL) {
      fprintf(stderr, "could not start PostgreSQL\n");
      return 1;
    }
    pclose(p);
    info[strcspn(info, "\n")] = 0;
    conninfo = info;
  } else {
    dir[0] = 0;
  }
  char datadir[300] = "";
  if (dir[0])
    snprintf(datadir, sizeof datadir, "%s/data", dir);
  else if (getenv("KEEL_BENCH_PG_DATA"))
    snprintf(datadir, sizeof datadir, "%s", getenv("KEEL_BENCH_PG_DATA"));
  PGconn *pc = PQconnectdb(conninfo);
  char *fs = scalar(pc, "SHOW fsync"), *sc = scalar(pc, "SHOW synchronous_commit");
  printf("server: fsync=%s synchronous_commit=%s\n", fs ? fs : "?", sc ? sc : "?");
  free(fs), free(sc);
  PQclear(PQexec(pc, "DROP SCHEMA IF EXISTS keel CASCADE"));

  sh = mmap(NULL, sizeof *sh + (size_t)njobs, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
            -1, 0);
  if (sh == MAP_FAILED) return 1;
  memset(sh, 0, sizeof *sh + (size_t)njobs);

  enq e = {0};
  uv_loop_init(&e.loop);
  keel_pgqueue_opts o;
  keel_pgqueue_opts_init(&o);
  o.conninfo = conninfo;
  o.queue = "bench";
  o.on_ready = on_ready;
  o.data = &e;
  o.stats_ms = 0;
  if (keel_pgqueue_new(&e.loop, &o, &e.q) != 0) return 1;
  run_until(&e.loop, e_ready, &e, 30);

  /* 1. enqueue */
  double t0 = bench_now_s();
  send_batches(&e);
  run_until(&e.loop, e_acked, &e, 600);
  double enq_s = bench_now_s() - t0;
  if (e.failed) return 1;
  id0 = e.min_id;
  printf("enqueued %ld jobs in %.2f s: %.0f jobs/s\n", njobs, enq_s, (double)njobs / enq_s);
  PQclear(PQexec(pc, "VACUUM ANALYZE keel.pgqueue_jobs"));
  if (getenv("KEEL_BENCH_SQL")) PQclear(PQexec(pc, getenv("KEEL_BENCH_SQL")));

  if (nworkers == 0) return 0; /* enqueue only (for EXPLAIN sessions) */
  /* 2. work */
  double srv0 = server_cpu_s(datadir), wrk0 = self_children_cpu_s();
  pid_t pids[64];
  for (int i = 0; i < nworkers; i++) {
    pids[i] = fork();
    if (pids[i] == 0) _exit(run_worker("bench", false));
  }
  while (atomic_load(&sh->ready) < nworkers) usleep(1000);
  double w0 = bench_now_s();
  atomic_store(&sh->go, 1);
  while (atomic_load(&sh->completed) < (uint64_t)njobs && bench_now_s() - w0 < 600) usleep(500);
  double w1 = bench_now_s();
  uint64_t ff = atomic_load(&sh->first_fetch_ns);
  double start = ff ? (double)ff / 1e9 : w0;
  double work_s = w1 - w0; /* from "go" (workers connected, idle) to the last completion written */
  printf("processed %" PRIu64 " jobs in %.3f s (first start %.1f ms after go): %.0f jobs/s\n",
         (uint64_t)atomic_load(&sh->completed), work_s, (start - w0) * 1000,
         (double)njobs / work_s);
  atomic_store(&sh->stop, 1);
  for (int i = 0; i < nworkers; i++) waitpid(pids[i], NULL, 0);
  double srv1 = server_cpu_s(datadir), wrk1 = self_children_cpu_s();
  /* CPU per job of the work phase (workers: from their exit; server: all
   * its processes, including autovacuum and the checkpointer meanwhile) */
  printf("cpu per job: workers %.1f us, server %.1f us%s\n", (wrk1 - wrk0) * 1e6 / (double)njobs,
         srv0 >= 0 && srv1 >= 0 ? (srv1 - srv0) * 1e6 / (double)njobs : 0.0,
         srv0 >= 0 && srv1 >= 0 ? "" : " (server not readable)");

  /* 3. pickup latency: one worker, jobs one by one at 200/s */
  atomic_store(&sh->stop, 0);
  atomic_store(&sh->ready, 0);
  pid_t pw = fork();
  if (pw == 0) _exit(run_worker("pickup", true));
  while (atomic_load(&sh->ready) < 1) usleep(1000);
  usleep(300000);
  keel_pgqueue_opts po = o;
  po.on_ready = NULL;
  po.migrate = false;
  for (int i = 0; i < 4; i++)
    if (keel_pgqueue_new(&e.loop, &po, &e.pq[i]) != 0) return 1;
  double warm = bench_now_s() + 1; /* let them connect */
  while (bench_now_s() < warm) uv_run(&e.loop, UV_RUN_NOWAIT), usleep(1000);
  e.pickup_left = 1000;
  uv_timer_init(&e.loop, &e.timer);
  e.timer.data = &e;
  uv_timer_start(&e.timer, pickup_tick, 5, 5);
  run_until(&e.loop, e_idle, &e, 60);
  usleep(300000);
  atomic_store(&sh->stop, 1);
  waitpid(pw, NULL, 0);
  int np = (int)atomic_load(&sh->pickup_n);
  if (np > 4096) np = 4096;
  double p50, p99;
  bench_percentiles_us(sh->pickup_ns, np, &p50, &p99);
  double a50, a99;
  bench_percentiles_us(e.ack_ns, e.nack, &a50, &a99);
  printf(
      "pickup: %d jobs, p50 %.2f ms, p99 %.2f ms (of which the enqueue's commit: p50 %.2f ms, "
      "p99 %.2f ms)\n",
      np, p50 / 1000, p99 / 1000, a50 / 1000, a99 / 1000);

  char fsync_note[160];
  fsync_probe(dir[0] ? dir : ".", fsync_note, sizeof fsync_note);

  /* 4. check */
  long lost = 0, dup = 0;
  for (long i = 0; i < njobs; i++) {
    unsigned r = atomic_load(&sh->runs[i]);
    if (r == 0)
      lost++;
    else if (r > 1)
      dup += r - 1;
  }
  char *left = scalar(pc, "SELECT count(*) FROM keel.pgqueue_jobs WHERE queue = 'bench'");
  long rows_left = left ? strtol(left, NULL, 10) : -1;
  free(left);
  if (rows_left != 0) {
    printf("rows left in the table: %ld\n", rows_left);
    if (rows_left > lost) lost = rows_left;
  }
  PQfinish(pc);
  keel_pgqueue_close(e.q, NULL, NULL);
  for (int i = 0; i < 4; i++) keel_pgqueue_close(e.pq[i], NULL, NULL);
  uv_close((uv_handle_t *)&e.timer, NULL);
  uv_run(&e.loop, UV_RUN_DEFAULT);
  uv_loop_close(&e.loop);
  if (dir[0]) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "scripts/pg-instance stop %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not stop %s\n", dir);
  }
  print_pickup_split(e.pick_i, fsync_note);
  printf(
      "pgqueue jobs_per_s=%.0f enqueue_per_s=%.0f pickup_p50_ms=%.2f pickup_p99_ms=%.2f "
      "lost=%ld dup=%ld\n",
      (double)njobs / work_s, (double)njobs / enq_s, p50 / 1000, p99 / 1000, lost, dup);
  return 0;
}
