/*
 * bench/listen_exact.c — the table listener with an installed trigger
 * (./scripts/bench listen_exact): typed filters, oversize rows, and the
 * listener's own CPU per change, each against a bare libpq floor in the
 * same run.
 *
 * Table bench_exact (id bigserial key, team int, price numeric(10,2),
 * seq bigint, sent_ns bigint, body text) with keel's trigger installed
 * (keel_listener_install_sql). A writer process (its own connection)
 * INSERTs rows, one per transaction, sent_ns being its CLOCK_MONOTONIC
 * time; the last row (seq -1) carries in sent_ns the number of rows the
 * listener should deliver. keel's listener subscribes with two filters on
 * typed columns, "team=eq.1&price=gt.10.50" (2 rows in 5 fail them). The
 * floor is a blocking poll + PQconsumeInput + PQnotifies loop that parses
 * the same payload minimally (team, price and sent_ns found with strstr,
 * price compared as a double), and reads an oversize change from
 * keel_overflow by id with a blocking PQexecParams.
 *  (a) 1,000 rows/s for BENCH_LISTEN_SECONDS (default 10): latency, and the
 *      listener's CPU per delivered change (getrusage RUSAGE_THREAD around
 *      the run, from just after the writer is forked to the last change:
 *      keel's loop runs on this thread; under valgrind --tool=callgrind the
 *      same window is dumped, labelled "keel mode 0" / "floor mode 0", for
 *      instructions per change)
 *  (b) the same with 1 row in 10 carrying a 20 KB body (oversize: written
 *      to keel_overflow by the trigger, fetched by the listener)
 *  (c) every row 20 KB, the writer at full speed: oversize changes per
 *      second delivered (the writer's own rate printed beside it)
 * Runs alternate floor / keel, 3 of each, medians. The last line is
 * listen_exact p50_us=.. floor_p50_us=.. oversize_per_s=.. lost=..
 * cpu_us_per_change=.. floor_cpu_us_per_change=..
 * (p50 and CPU from (a); lost: every keel run).
 * BENCH_LISTEN_ONLY=a|b|c runs one part, BENCH_LISTEN_SIDE=keel|floor one
 * listener (to profile or trace it).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "pq.h"
#include "keel/listen.h"

#define RUNS 3
#define MAX_SAMPLES 400000
#define BIG_BODY 20000
#define CHANNEL "bench_exact"
#define FILTER "team=eq.1&price=gt.10.50"

static const char *conninfo;
static int seconds = 10;

static PGconn *connect_or_die(void) {
  return bench_pq_connect(conninfo);
}

static void setup_table(void) {
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "SET client_min_messages = warning");
  bench_pq_exec(conn,
                "CREATE TABLE IF NOT EXISTS public.bench_exact (id bigserial PRIMARY KEY, team int "
                "NOT NULL, price numeric(10,2) NOT NULL, seq bigint NOT NULL, sent_ns bigint NOT "
                "NULL, body text)");
  static char sql[16384];
  if (keel_listener_install_sql(sql, sizeof sql, "public.bench_exact", "id", CHANNEL) < 0) {
    fprintf(stderr, "keel_listener_install_sql failed\n");
    exit(1);
  }
  bench_pq_exec(conn, sql);
  bench_pq_exec(conn, "TRUNCATE public.bench_exact, public.keel_overflow");
  PQfinish(conn);
}

static void truncate_tables(void) {
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "TRUNCATE public.bench_exact, public.keel_overflow");
  bench_pq_exec(conn, "VACUUM public.bench_exact, public.keel_overflow");
  PQfinish(conn);
}

/* ---- writer (child process) ------------------------------------------------ */

typedef enum mode { MODE_FILTERED, MODE_OVERSIZE_10, MODE_FULL_SPEED } mode;

/* 20 KB of text that does not compress much (TOAST would make a run of one
 * letter nearly free); the writer changes its first bytes per row. */
static char big_body[BIG_BODY + 1];

static void fill_body(void) {
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (int i = 0; i < BIG_BODY; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    big_body[i] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[x % 62];
  }
  big_body[BIG_BODY] = '\0';
}

static int insert_row(PGconn *conn, int team, const char *price, long long seq,
                      unsigned long long sent_ns, const char *body) {
  char team_s[16], seq_s[32], sent_s[32];
  snprintf(team_s, sizeof team_s, "%d", team);
  snprintf(seq_s, sizeof seq_s, "%lld", seq);
  snprintf(sent_s, sizeof sent_s, "%llu", sent_ns);
  const char *params[] = {team_s, price, seq_s, sent_s, body};
  PGresult *res = PQexecParams(conn,
                               "INSERT INTO public.bench_exact (team, price, seq, sent_ns, body) "
                               "VALUES ($1, $2, $3, $4, $5)",
                               5, NULL, params, NULL, NULL, 0);
  int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
  if (!ok) fprintf(stderr, "insert: %s", PQerrorMessage(conn));
  PQclear(res);
  return ok;
}

static void write_rows(mode m) {
  PGconn *conn = connect_or_die();
  struct timespec next;
  clock_gettime(CLOCK_MONOTONIC, &next);
  uint64_t start = bench_mono_ns();
  uint64_t end = start + (uint64_t)seconds * 1000000000ull;
  long long seq = 0, matching = 0;
  while (m == MODE_FULL_SPEED ? bench_mono_ns() < end : seq < (long long)seconds * 1000) {
    /* 2 rows in 5 fail the filter: team 2, or a price not above 10.50 */
    int team = seq % 5 == 3 ? 2 : 1;
    const char *price = seq % 5 == 4 ? "10.50" : "19.90";
    if (m == MODE_FULL_SPEED) {
      team = 1;
      price = "19.90";
    }
    bool big = m == MODE_FULL_SPEED || (m == MODE_OVERSIZE_10 && seq % 10 == 7);
    const char *body = "small";
    if (big) {
      snprintf(big_body, 21, "%020lld", seq);
      big_body[20] = 'x';
      body = big_body;
    }
    if (!insert_row(conn, team, price, seq, bench_mono_ns(), body)) _exit(1);
    if (team == 1 && price[0] == '1' && price[1] == '9') matching++;
    seq++;
    if (m != MODE_FULL_SPEED) {
      next.tv_nsec += 1000000L;
      while (next.tv_nsec >= 1000000000L) {
        next.tv_nsec -= 1000000000L;
        next.tv_sec++;
      }
      clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
  }
  if (m == MODE_FULL_SPEED) {
    double span = (double)(bench_mono_ns() - start) / 1e9;
    printf("(c) writer: %lld rows of 20 KB in %.1f s, %.0f rows/s (one per transaction)\n", seq,
           span, (double)seq / span);
    fflush(stdout);
  }
  /* the END row matches the filter; sent_ns = how many should arrive */
  if (!insert_row(conn, 1, "19.90", -1, (unsigned long long)matching, "END")) _exit(1);
  PQfinish(conn);
}

static pid_t start_writer(mode m) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    write_rows(m);
    _exit(0);
  }
  return pid;
}

/* ---- measurement ----------------------------------------------------------------- */

typedef struct run_result {
  double p50_us, p99_us;
  double per_second;
  double cpu_us_per_change;
  long long received, expected;
} run_result;

typedef struct sink {
  uint64_t *samples;
  int count;
  long long received;
  uint64_t first_ns, last_ns;
  long long expected;
  bool done;
  double cpu_us;
} sink;

/* The label of the run being measured, for callgrind's dump. */
static char window_label[64];

static double thread_cpu_us(void) {
  struct rusage ru;
  getrusage(RUSAGE_THREAD, &ru);
  return (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec +
         (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
}

/* One delivered change: seq and sent_ns as text. */
static void sink_change(sink *s, const char *seq, const char *sent_ns) {
  uint64_t now = bench_mono_ns();
  if (seq == NULL || sent_ns == NULL) return;
  if (seq[0] == '-') {
    s->expected = atoll(sent_ns);
    s->done = true;
    s->cpu_us = thread_cpu_us() - s->cpu_us;
    /* under valgrind --tool=callgrind: the instructions of this window */
    CALLGRIND_DUMP_STATS_AT(window_label);
    return;
  }
  uint64_t sent = strtoull(sent_ns, NULL, 10);
  if (s->received == 0) s->first_ns = now;
  s->last_ns = now;
  s->received++;
  if (s->count < MAX_SAMPLES) s->samples[s->count++] = now - sent;
}

static run_result summarize(sink *s) {
  run_result r = {0};
  bench_percentiles_us(s->samples, s->count, &r.p50_us, &r.p99_us);
  double span = (double)(s->last_ns - s->first_ns) / 1e9;
  r.per_second = span > 0 ? (double)s->received / span : 0;
  r.received = s->received;
  r.expected = s->expected;
  r.cpu_us_per_change = s->received > 0 ? s->cpu_us / (double)s->received : 0;
  return r;
}

/* ---- the floor: bare libpq, minimal parsing ----------------------------------- */

/* The text of a number after "key": in a JSON object (no copy: ends at the
 * first character that is not part of a number). */
static const char *json_number(const char *json, const char *key, char *buf, size_t cap) {
  const char *p = strstr(json, key);
  if (p == NULL) return NULL;
  p += strlen(key);
  size_t n = 0;
  while (n + 1 < cap && (p[n] == '-' || p[n] == '.' || (p[n] >= '0' && p[n] <= '9'))) {
    buf[n] = p[n];
    n++;
  }
  buf[n] = '\0';
  return n > 0 ? buf : NULL;
}

static void floor_payload(sink *s, PGconn *conn, const char *payload) {
  char id[32], team[16], price[32], seq[32], sent[32];
  PGresult *res = NULL;
  if (json_number(payload, "\"overflow\": ", id, sizeof id) != NULL) {
    const char *params[] = {id};
    res = PQexecParams(conn, "SELECT payload FROM public.keel_overflow WHERE id = $1", 1, NULL,
                       params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
      PQclear(res);
      return;
    }
    payload = PQgetvalue(res, 0, 0);
  }
  const char *new_row = strstr(payload, "\"new\": {");
  if (new_row != NULL && json_number(new_row, "\"team\": ", team, sizeof team) != NULL &&
      strcmp(team, "1") == 0 && json_number(new_row, "\"price\": ", price, sizeof price) != NULL &&
      strtod(price, NULL) > 10.50)
    sink_change(s, json_number(new_row, "\"seq\": ", seq, sizeof seq),
                json_number(new_row, "\"sent_ns\": ", sent, sizeof sent));
  PQclear(res);
}

static run_result floor_run(mode m, uint64_t *samples) {
  sink s = {samples, 0, 0, 0, 0, -1, false, 0};
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "LISTEN " CHANNEL);
  pid_t writer = start_writer(m);
  snprintf(window_label, sizeof window_label, "floor mode %d", (int)m);
  CALLGRIND_ZERO_STATS;
  s.cpu_us = thread_cpu_us();
  struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
  while (!s.done) {
    if (poll(&pfd, 1, 30000) <= 0) break;
    PQconsumeInput(conn);
    PGnotify *n;
    while ((n = PQnotifies(conn)) != NULL) {
      floor_payload(&s, conn, n->extra);
      PQfreemem(n);
    }
  }
  waitpid(writer, NULL, 0);
  PQfinish(conn);
  return summarize(&s);
}

/* ---- keel ------------------------------------------------------------------------ */

typedef struct keel_ctx {
  sink s;
  keel_listener *l;
  pid_t writer;
  mode m;
} keel_ctx;

static void on_change(keel_listener *l, const keel_change *c, void *data) {
  keel_ctx *k = data;
  sink_change(&k->s, keel_change_new(c, "seq"), keel_change_new(c, "sent_ns"));
  if (k->s.done) keel_listener_close(l, NULL, NULL);
}

static void on_error(keel_listener *l, int err, const char *message, void *data) {
  (void)l;
  (void)data;
  fprintf(stderr, "listener error %d: %s\n", err, message);
}

static void check_active(uv_timer_t *timer) {
  keel_ctx *k = timer->data;
  if (!keel_listener_is_active(k->l)) return;
  uv_timer_stop(timer);
  uv_close((uv_handle_t *)timer, NULL);
  k->writer = start_writer(k->m);
  snprintf(window_label, sizeof window_label, "keel mode %d", (int)k->m);
  CALLGRIND_ZERO_STATS;
  k->s.cpu_us = thread_cpu_us();
}

static run_result keel_run(mode m, uint64_t *samples) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_ctx k = {{samples, 0, 0, 0, 0, -1, false, 0}, NULL, 0, m};
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = conninfo;
  o.table = "public.bench_exact";
  o.filter = FILTER;
  o.channel = CHANNEL;
  o.events = KEEL_CHANGE_INSERT;
  o.on_error = on_error;
  char why[256];
  if (keel_listener_new_ex(&loop, &o, &k.l, why, sizeof why) != 0) {
    fprintf(stderr, "keel_listener_new: %s\n", why);
    exit(1);
  }
  keel_listener_on(k.l, "bench", on_change, &k);
  keel_listener_start(k.l);
  uv_timer_t timer;
  uv_timer_init(&loop, &timer);
  timer.data = &k;
  uv_timer_start(&timer, check_active, 1, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  waitpid(k.writer, NULL, 0);
  uv_loop_close(&loop);
  return summarize(&k.s);
}

int main(void) {
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') {
    fprintf(stderr, "KEEL_PG is not set (run ./scripts/bench listen_exact)\n");
    return 1;
  }
  if (getenv("BENCH_LISTEN_SECONDS") != NULL) seconds = atoi(getenv("BENCH_LISTEN_SECONDS"));
  if (seconds < 1) seconds = 1;
  fill_body();
  setup_table();
  static uint64_t samples[MAX_SAMPLES];
  run_result keel_r[3][RUNS], floor_r[3][RUNS];
  memset(keel_r, 0, sizeof keel_r);
  memset(floor_r, 0, sizeof floor_r);
  long long lost = 0;
  const char *names[] = {"(a) filtered, 1,000 rows/s", "(b) 10 % oversize, 1,000 rows/s",
                         "(c) all oversize, full speed"};
  /* BENCH_LISTEN_ONLY=a|b|c runs one part only (to profile it) */
  const char *only = getenv("BENCH_LISTEN_ONLY");
  /* BENCH_LISTEN_SIDE=keel|floor runs one listener only (to trace it) */
  const char *side = getenv("BENCH_LISTEN_SIDE");
  for (int m = 0; m < 3; m++) {
    if (only != NULL && only[0] != 'a' + m) continue;
    for (int r = 0; r < RUNS; r++) {
      if (side == NULL || strcmp(side, "floor") == 0) {
        floor_r[m][r] = floor_run((mode)m, samples);
        truncate_tables();
      }
      if (side == NULL || strcmp(side, "keel") == 0) {
        keel_r[m][r] = keel_run((mode)m, samples);
        truncate_tables();
      }
      run_result *f = &floor_r[m][r], *k = &keel_r[m][r];
      printf(
          "%s run %d: floor p50 %.0f us p99 %.0f us %.0f/s cpu %.1f us/change (%lld/%lld) | keel "
          "p50 %.0f us p99 %.0f us %.0f/s cpu %.1f us/change (%lld/%lld)\n",
          names[m], r + 1, f->p50_us, f->p99_us, f->per_second, f->cpu_us_per_change, f->received,
          f->expected, k->p50_us, k->p99_us, k->per_second, k->cpu_us_per_change, k->received,
          k->expected);
      fflush(stdout);
      lost += k->expected < 0 ? 1 : k->expected - k->received;
    }
  }
#define MED(arr, field) bench_median3(arr[0].field, arr[1].field, arr[2].field)
  double p50 = MED(keel_r[0], p50_us), fp50 = MED(floor_r[0], p50_us);
  double p99 = MED(keel_r[0], p99_us), fp99 = MED(floor_r[0], p99_us);
  double cpu = MED(keel_r[0], cpu_us_per_change), fcpu = MED(floor_r[0], cpu_us_per_change);
  double bp50 = MED(keel_r[1], p50_us), fbp50 = MED(floor_r[1], p50_us);
  double bcpu = MED(keel_r[1], cpu_us_per_change), fbcpu = MED(floor_r[1], cpu_us_per_change);
  double over = MED(keel_r[2], per_second), fover = MED(floor_r[2], per_second);
  printf(
      "(a) medians: p50 %.0f us (floor %.0f), p99 %.0f us (floor %.0f), cpu %.1f us/change "
      "(floor %.1f)\n",
      p50, fp50, p99, fp99, cpu, fcpu);
  printf("(b) medians: p50 %.0f us (floor %.0f), cpu %.1f us/change (floor %.1f)\n", bp50, fbp50,
         bcpu, fbcpu);
  printf("(c) medians: %.0f oversize changes/s delivered (floor %.0f)\n", over, fover);
  printf(
      "bars: p50 %.0f <= %.0f (floor + 30 us): %s; cpu %.1f <= %.1f (1.5 x floor): %s; lost "
      "%lld: %s\n",
      p50, fp50 + 30, p50 <= fp50 + 30 ? "yes" : "NO", cpu, fcpu * 1.5,
      cpu <= fcpu * 1.5 ? "yes" : "NO", lost, lost == 0 ? "yes" : "NO");
  printf(
      "listen_exact p50_us=%.0f floor_p50_us=%.0f oversize_per_s=%.0f lost=%lld "
      "cpu_us_per_change=%.1f floor_cpu_us_per_change=%.1f\n",
      p50, fp50, over, lost, cpu, fcpu);
  return 0;
}
