/*
 * bench/listen.c — NOTIFY latency and throughput (./scripts/bench listen).
 *
 * A sender process (its own connection) sends
 * SELECT pg_notify('bench', '{"s":<seq>,"t":"<CLOCK_MONOTONIC ns>"}').
 * keel's listener (a raw channel of keel_listener on the loop) is measured
 * against a floor in the same run: a bare blocking loop of poll +
 * PQconsumeInput + PQnotifies, no event loop, no JSON library. Runs
 * alternate, medians are reported.
 *  (a) 1,000 notifications/s, one per transaction, 10,000 of them: latency
 *  (b) 1,000 NOTIFYs per transaction for 10 s: receive rate
 *  (c) pgbench -c 4 -T 10 (one client thread, pgbench's default) with a
 *      one-line NOTIFY script, alone and with keel's listener attached: tps
 *      ratio, and nothing lost. The same with the floor's listener shows
 *      what any listener costs the server: every notifying commit signals
 *      each listening backend that is behind, and that backend wakes up.
 *      6 rounds of (alone, keel, floor) in rotating order after a warm-up
 *      run; medians of the per-round ratios; each listener's own CPU per
 *      notification (its process's rusage) printed beside, with the kernel's
 *      share of it and the notifications handled per wake-up (received over
 *      the process's voluntary context switches: each is one sleep waiting
 *      for the socket).
 * BENCH_LISTEN_SECONDS shortens (a), (b) and (c) for a quick look.
 * Under valgrind --tool=callgrind each listener's window (from the sender's
 * start, or from "ready" in (c), to the last notification) is dumped,
 * labelled "keel a" / "floor a" / "keel c" / "floor c", for instructions
 * per notification; BENCH_LISTEN_ONLY=a|c runs one part.
 */
#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <signal.h>
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
#define MAX_SAMPLES 200000

static const char *conninfo;
static int seconds = 10;

static PGconn *connect_or_die(void) {
  return bench_pq_connect(conninfo);
}

/* ---- sender (child process) ---------------------------------------------- */

static void send_paced(int count, int per_second) {
  PGconn *conn = connect_or_die();
  struct timespec next;
  clock_gettime(CLOCK_MONOTONIC, &next);
  char payload[96];
  for (int seq = 0; seq < count; seq++) {
    snprintf(payload, sizeof payload, "{\"s\":%d,\"t\":\"%llu\"}", seq,
             (unsigned long long)bench_mono_ns());
    const char *params[] = {payload};
    PGresult *res =
        PQexecParams(conn, "SELECT pg_notify('bench', $1)", 1, NULL, params, NULL, NULL, 0);
    PQclear(res);
    next.tv_nsec += 1000000000L / per_second;
    while (next.tv_nsec >= 1000000000L) {
      next.tv_nsec -= 1000000000L;
      next.tv_sec++;
    }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
  }
  bench_pq_exec(conn, "SELECT pg_notify('bench', 'END')");
  PQfinish(conn);
}

static void send_batched(int batch_seconds) {
  PGconn *conn = connect_or_die();
  uint64_t end = bench_mono_ns() + (uint64_t)batch_seconds * 1000000000ull;
  long long base = 0;
  char sql[256];
  while (bench_mono_ns() < end) {
    snprintf(sql, sizeof sql,
             "SELECT count(pg_notify('bench', '{\"s\":' || (g + %lld) || ',\"t\":\"%llu\"}')) "
             "FROM generate_series(1, 1000) g",
             base, (unsigned long long)bench_mono_ns());
    bench_pq_exec(conn, sql);
    base += 1000;
  }
  snprintf(sql, sizeof sql, "SELECT pg_notify('bench', 'END %lld')", base);
  bench_pq_exec(conn, sql);
  PQfinish(conn);
}

static pid_t start_sender(int batched) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    if (batched)
      send_batched(seconds);
    else
      send_paced(seconds * 1000, 1000);
    _exit(0);
  }
  return pid;
}

/* ---- measurements ----------------------------------------------------------- */

typedef struct run_result {
  double p50_us, p99_us;
  double per_second;
  long long received;
  long long expected;
} run_result;

typedef struct sink {
  uint64_t *samples;
  int count;
  long long received;
  uint64_t first_ns, last_ns;
  long long expected; /* from the END marker; -1 until seen */
  bool done;
} sink;

static void sink_payload(sink *s, const char *payload) {
  uint64_t now = bench_mono_ns();
  if (strncmp(payload, "END", 3) == 0) {
    s->expected = payload[3] == ' ' ? atoll(payload + 4) : s->received;
    s->done = true;
    return;
  }
  const char *t = strstr(payload, "\"t\":\"");
  if (t == NULL) return;
  uint64_t sent = strtoull(t + 5, NULL, 10);
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
  return r;
}

static run_result floor_run(int batched) {
  static uint64_t samples[MAX_SAMPLES];
  sink s = {samples, 0, 0, 0, 0, -1, false};
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "LISTEN bench");
  pid_t sender = start_sender(batched);
  CALLGRIND_ZERO_STATS;
  struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
  while (!s.done) {
    if (poll(&pfd, 1, 30000) <= 0) break;
    PQconsumeInput(conn);
    PGnotify *n;
    while ((n = PQnotifies(conn)) != NULL) {
      sink_payload(&s, n->extra);
      PQfreemem(n);
    }
  }
  CALLGRIND_DUMP_STATS_AT(batched ? "floor b" : "floor a");
  waitpid(sender, NULL, 0);
  PQfinish(conn);
  return summarize(&s);
}

typedef struct keel_ctx {
  sink s;
  keel_listener *l;
  pid_t sender;
  int batched;
  bool started;
} keel_ctx;

static void on_bench(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)channel;
  keel_ctx *k = data;
  sink_payload(&k->s, payload);
  if (k->s.done) {
    CALLGRIND_DUMP_STATS_AT(k->batched ? "keel b" : "keel a");
    keel_listener_close(l, NULL, NULL);
  }
}

static void check_active(uv_timer_t *timer) {
  keel_ctx *k = timer->data;
  if (!keel_listener_is_active(k->l)) return;
  uv_timer_stop(timer);
  uv_close((uv_handle_t *)timer, NULL);
  k->sender = start_sender(k->batched);
  CALLGRIND_ZERO_STATS;
}

static run_result keel_run(int batched) {
  static uint64_t samples[MAX_SAMPLES];
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_ctx k = {{samples, 0, 0, 0, 0, -1, false}, NULL, 0, batched, false};
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = conninfo;
  if (keel_listener_new(&loop, &o, &k.l) != 0) exit(1);
  keel_listener_listen_channel(k.l, "bench", on_bench, &k);
  keel_listener_start(k.l);
  uv_timer_t timer;
  uv_timer_init(&loop, &timer);
  timer.data = &k;
  uv_timer_start(&timer, check_active, 1, 1);
  uv_run(&loop, UV_RUN_DEFAULT);
  waitpid(k.sender, NULL, 0);
  uv_loop_close(&loop);
  return summarize(&k.s);
}

/* ---- (c) pgbench ------------------------------------------------------------ */

static double pgbench_tps(long long *processed) {
  return bench_pgbench(conninfo, "SELECT pg_notify('bench', 'p' || random()::text);\n", 4, 0,
                       seconds, processed);
}

typedef struct count_ctx {
  long long received;
  keel_listener *l;
  bool stop;
} count_ctx;

static void on_count(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)l;
  (void)channel;
  count_ctx *c = data;
  if (strcmp(payload, "END") == 0) {
    c->stop = true;
    return;
  }
  c->received++;
}

/* The floor's listener for (c): a blocking loop counting notifications. */
static void floor_count(int fd) {
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "LISTEN bench");
  if (write(fd, "R", 1) != 1) _exit(1);
  CALLGRIND_ZERO_STATS;
  long long received = 0;
  bool stop = false;
  struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
  while (!stop && poll(&pfd, 1, 60000) > 0) {
    PQconsumeInput(conn);
    PGnotify *n;
    while ((n = PQnotifies(conn)) != NULL) {
      if (strcmp(n->extra, "END") == 0)
        stop = true;
      else
        received++;
      PQfreemem(n);
    }
  }
  CALLGRIND_DUMP_STATS_AT("floor c");
  dprintf(fd, "%lld\n", received);
  PQfinish(conn);
}

/* (c) one pgbench run with no listener, keel's or the floor's (in a child
 * process, counting): its tps, what it sent and what the listener received,
 * and the listener's own CPU per notification (the child's rusage). */
typedef enum listener_kind { LISTENER_NONE, LISTENER_KEEL, LISTENER_FLOOR } listener_kind;

typedef struct impact_run {
  double tps;
  long long sent, received;
  double cpu_us_per_notification;
  double sys_share;               /* of that CPU, the part spent in the kernel */
  double notifications_per_sleep; /* received / voluntary context switches */
} impact_run;

static void keel_count(int fd) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  count_ctx c = {0, NULL, false};
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = conninfo;
  if (keel_listener_new(&loop, &o, &c.l) != 0) _exit(1);
  keel_listener_listen_channel(c.l, "bench", on_count, &c);
  keel_listener_start(c.l);
  while (!keel_listener_is_active(c.l)) uv_run(&loop, UV_RUN_ONCE);
  if (write(fd, "R", 1) != 1) _exit(1);
  CALLGRIND_ZERO_STATS;
  while (!c.stop) uv_run(&loop, UV_RUN_ONCE);
  CALLGRIND_DUMP_STATS_AT("keel c");
  dprintf(fd, "%lld\n", c.received);
  keel_listener_close(c.l, NULL, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
}

static impact_run pgbench_with(listener_kind kind) {
  impact_run r = {0, 0, 0, 0, 0, 0};
  if (kind == LISTENER_NONE) {
    r.tps = pgbench_tps(&r.sent);
    return r;
  }
  int counts[2];
  if (pipe(counts) != 0) exit(1);
  fflush(stdout);
  pid_t child = fork();
  if (child == 0) {
    close(counts[0]);
    if (kind == LISTENER_KEEL)
      keel_count(counts[1]);
    else
      floor_count(counts[1]);
    _exit(0);
  }
  close(counts[1]);
  char ready;
  if (read(counts[0], &ready, 1) != 1) exit(1);
  r.tps = pgbench_tps(&r.sent);
  PGconn *conn = connect_or_die();
  bench_pq_exec(conn, "SELECT pg_notify('bench', 'END')");
  PQfinish(conn);
  char buf[64] = "";
  ssize_t n = read(counts[0], buf, sizeof buf - 1);
  if (n > 0) buf[n] = '\0';
  close(counts[0]);
  struct rusage ru;
  memset(&ru, 0, sizeof ru);
  wait4(child, NULL, 0, &ru);
  r.received = atoll(buf);
  double cpu_us = (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec +
                  (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
  r.cpu_us_per_notification = r.received > 0 ? cpu_us / (double)r.received : 0;
  double sys_us = (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
  r.sys_share = cpu_us > 0 ? sys_us / cpu_us : 0;
  /* each time the listener blocks waiting for its socket is one voluntary
   * context switch: notifications per wake-up, without counting in the loop */
  r.notifications_per_sleep = ru.ru_nvcsw > 0 ? (double)r.received / (double)ru.ru_nvcsw : 0;
  return r;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *values, int count) {
  qsort(values, (size_t)count, sizeof *values, cmp_double);
  return count % 2 ? values[count / 2] : (values[count / 2 - 1] + values[count / 2]) / 2;
}

/*
 * (c) C_ROUNDS rounds, each one pgbench run with no listener, one with
 * keel's and one with the floor's, in an order that rotates from round to
 * round (each kind runs equally often first, second and third: a load that
 * drifts during the benchmark favours none of them). A round's ratios are
 * its runs with a listener over its run without (minutes apart at most);
 * the medians over the rounds are reported. Before the first round a short
 * pgbench run warms the server up (not counted). *lost: sent - received
 * over keel's runs.
 */
#define C_ROUNDS 6

static void server_impact(double *keel_ratio, double *floor_ratio, long long *lost) {
  static const listener_kind orders[3][3] = {{LISTENER_NONE, LISTENER_KEEL, LISTENER_FLOOR},
                                             {LISTENER_KEEL, LISTENER_FLOOR, LISTENER_NONE},
                                             {LISTENER_FLOOR, LISTENER_NONE, LISTENER_KEEL}};
  static const char *names[] = {"none", "keel", "floor"};
  (void)bench_pgbench(conninfo, "SELECT pg_notify('bench', 'p' || random()::text);\n", 4, 0, 2,
                      NULL);
  double keel_r[C_ROUNDS], floor_r[C_ROUNDS], keel_cpu[C_ROUNDS], floor_cpu[C_ROUNDS];
  *lost = 0;
  for (int round = 0; round < C_ROUNDS; round++) {
    impact_run runs[3];
    for (int i = 0; i < 3; i++) {
      listener_kind kind = orders[round % 3][i];
      runs[kind] = pgbench_with(kind);
    }
    keel_r[round] =
        runs[LISTENER_NONE].tps > 0 ? runs[LISTENER_KEEL].tps / runs[LISTENER_NONE].tps : 0;
    floor_r[round] =
        runs[LISTENER_NONE].tps > 0 ? runs[LISTENER_FLOOR].tps / runs[LISTENER_NONE].tps : 0;
    keel_cpu[round] = runs[LISTENER_KEEL].cpu_us_per_notification;
    floor_cpu[round] = runs[LISTENER_FLOOR].cpu_us_per_notification;
    *lost += runs[LISTENER_KEEL].sent - runs[LISTENER_KEEL].received;
    const impact_run *kr = &runs[LISTENER_KEEL], *fr = &runs[LISTENER_FLOOR];
    printf(
        "(c) round %d (%s, %s, %s): pgbench NOTIFY tps alone %.0f | keel listening %.0f, ratio "
        "%.2f, %lld/%lld received, listener cpu %.1f us/notification (%.0f %% kernel, %.1f "
        "notifications/wake-up) | floor listening %.0f, ratio %.2f, %lld/%lld received, listener "
        "cpu %.1f us/notification (%.0f %% kernel, %.1f notifications/wake-up) | keel/floor tps "
        "%.2f\n",
        round + 1, names[orders[round % 3][0]], names[orders[round % 3][1]],
        names[orders[round % 3][2]], runs[LISTENER_NONE].tps, kr->tps, keel_r[round], kr->received,
        kr->sent, keel_cpu[round], kr->sys_share * 100, kr->notifications_per_sleep, fr->tps,
        floor_r[round], fr->received, fr->sent, floor_cpu[round], fr->sys_share * 100,
        fr->notifications_per_sleep,
        runs[LISTENER_FLOOR].tps > 0 ? runs[LISTENER_KEEL].tps / runs[LISTENER_FLOOR].tps : 0);
    fflush(stdout);
  }
  *keel_ratio = median(keel_r, C_ROUNDS);
  *floor_ratio = median(floor_r, C_ROUNDS);
  printf(
      "(c) medians of %d rounds: keel ratio %.2f, listener cpu %.1f us/notification | floor ratio "
      "%.2f, listener cpu %.1f us/notification\n",
      C_ROUNDS, *keel_ratio, median(keel_cpu, C_ROUNDS), *floor_ratio, median(floor_cpu, C_ROUNDS));
}

int main(void) {
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') {
    fprintf(stderr, "KEEL_PG is not set (run ./scripts/bench listen)\n");
    return 1;
  }
  if (getenv("BENCH_LISTEN_SECONDS") != NULL) seconds = atoi(getenv("BENCH_LISTEN_SECONDS"));
  if (seconds < 1) seconds = 1;
  /* BENCH_LISTEN_ONLY=c runs only the server-impact comparison, alternating
   * keel's listener and the floor's, to study it without the rest. */
  const char *only = getenv("BENCH_LISTEN_ONLY");
  if (only != NULL && strcmp(only, "c") == 0) {
    double k, f;
    long long lost_c;
    server_impact(&k, &f, &lost_c);
    printf("(c) keel ratio %.2f lost %lld | floor ratio %.2f\n", k, lost_c, f);
    return 0;
  }
  /* BENCH_LISTEN_ONLY=a: one (a) run of each listener, or of the one named
   * by BENCH_LISTEN_SIDE=keel|floor (to profile it). */
  if (only != NULL && strcmp(only, "a") == 0) {
    const char *side = getenv("BENCH_LISTEN_SIDE");
    if (side == NULL || strcmp(side, "floor") == 0) {
      run_result f = floor_run(0);
      printf("(a) floor p50 %.0f us p99 %.0f us (%lld)\n", f.p50_us, f.p99_us, f.received);
    }
    if (side == NULL || strcmp(side, "keel") == 0) {
      run_result k = keel_run(0);
      printf("(a) keel p50 %.0f us p99 %.0f us (%lld/%lld)\n", k.p50_us, k.p99_us, k.received,
             k.expected);
    }
    return 0;
  }

  run_result keel_a[RUNS], floor_a[RUNS], keel_b[RUNS], floor_b[RUNS];
  long long lost = 0;
  for (int r = 0; r < RUNS; r++) {
    floor_a[r] = floor_run(0);
    keel_a[r] = keel_run(0);
    printf("(a) run %d: floor p50 %.0f us p99 %.0f us | keel p50 %.0f us p99 %.0f us (%lld/%lld)\n",
           r + 1, floor_a[r].p50_us, floor_a[r].p99_us, keel_a[r].p50_us, keel_a[r].p99_us,
           keel_a[r].received, keel_a[r].expected);
    lost += keel_a[r].expected - keel_a[r].received;
  }
  for (int r = 0; r < RUNS; r++) {
    floor_b[r] = floor_run(1);
    keel_b[r] = keel_run(1);
    printf("(b) run %d: floor %.0f/s | keel %.0f/s (%lld of %lld)\n", r + 1, floor_b[r].per_second,
           keel_b[r].per_second, keel_b[r].received, keel_b[r].expected);
    lost += keel_b[r].expected - keel_b[r].received;
  }
  double ratio, floor_ratio;
  long long lost_c;
  server_impact(&ratio, &floor_ratio, &lost_c);
  lost += lost_c;

  double p50 = bench_median3(keel_a[0].p50_us, keel_a[1].p50_us, keel_a[2].p50_us);
  double p99 = bench_median3(keel_a[0].p99_us, keel_a[1].p99_us, keel_a[2].p99_us);
  double fp50 = bench_median3(floor_a[0].p50_us, floor_a[1].p50_us, floor_a[2].p50_us);
  double fp99 = bench_median3(floor_a[0].p99_us, floor_a[1].p99_us, floor_a[2].p99_us);
  double kb = bench_median3(keel_b[0].per_second, keel_b[1].per_second, keel_b[2].per_second);
  double fb = bench_median3(floor_b[0].per_second, floor_b[1].per_second, floor_b[2].per_second);
  printf(
      "bars: p50 %.0f <= %.0f (floor + 30 us): %s; p99 %.0f <= %.0f (1.25 x floor): %s; "
      "batched %.0f >= %.0f (0.9 x floor): %s; server ratio %.2f >= 0.85: %s (floor listener: "
      "%.2f)\n",
      p50, fp50 + 30, p50 <= fp50 + 30 ? "yes" : "NO", p99, fp99 * 1.25,
      p99 <= fp99 * 1.25 ? "yes" : "NO", kb, fb * 0.9, kb >= fb * 0.9 ? "yes" : "NO", ratio,
      ratio >= 0.85 ? "yes" : "NO", floor_ratio);
  printf(
      "peers (issue): libpq floor p50 200-230 us, p99 0.65-1.9 ms, batched 1.9 M/s; pgx v4 p99 "
      "0.7-1.7 ms, batched 0.19 M/s; node pg p99 1.9-2.4 ms, batched 1.08 M/s, server ratio "
      "0.69\n");
  printf(
      "listen p50_us=%.0f p99_us=%.0f floor_p50_us=%.0f floor_p99_us=%.0f batched_per_s=%.0f "
      "floor_batched_per_s=%.0f server_ratio=%.2f lost=%lld\n",
      p50, p99, fp50, fp99, kb, fb, ratio, lost);
  return 0;
}
