/* The verifier's leader lease (issue 20): a lease row with an owner, an
 * expiry by the server's clock and a fence, safe through a transaction
 * pooler.
 *
 * - lease_basics: two verifiers, one leads under a fence; the other takes
 *   over with a higher fence once the first gives the lease up.
 * - pooler_runs_never_overlap: two forked processes through their own
 *   PgBouncer (transaction mode) whose server connections are killed again
 *   and again; every fix-up writes a fenced row stamped with
 *   clock_timestamp(); the run intervals (first to last write of a run)
 *   of different runs never overlap, and no fence is shared by two
 *   processes.
 * - stalled_leader_is_fenced: the leader is SIGSTOPped past the ttl in
 *   the middle of a fix-up; a second process takes over with a higher
 *   fence; the first, resumed, writes nothing (its fenced write affects 0
 *   rows) and its run ends with KEEL_ENOTLEADER. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "keel/verify.h"
#include "support/harness.h"

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static long scalar_long(const char *fmt, const char *a) {
  char *s = kt_pg_scalarf(fmt, a);
  long v = s ? strtol(s, NULL, 10) : -1;
  free(s);
  return v;
}

/* ---- lease basics, one process ------------------------------------------------ */

static bool count_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)row, (void)data;
  return true;
}

typedef struct two {
  uv_loop_t loop;
  keel_verify *a, *b;
  int closed;
} two;

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((two *)data)->closed++;
}

static bool a_completed(void *ctx) {
  keel_verify_stats st;
  keel_verify_get_stats(((two *)ctx)->a, &st);
  return st.runs_completed >= 2;
}

static bool b_refused(void *ctx) {
  keel_verify_stats st;
  keel_verify_get_stats(((two *)ctx)->b, &st);
  return st.runs_not_leader >= 2;
}

static bool b_completed(void *ctx) {
  keel_verify_stats st;
  keel_verify_get_stats(((two *)ctx)->b, &st);
  return st.runs_completed >= 1;
}

static bool closed_one(void *ctx) {
  return ((two *)ctx)->closed >= 1;
}

static bool closed_two(void *ctx) {
  return ((two *)ctx)->closed >= 2;
}

Test(verify_lease, lease_basics) {
  two t;
  memset(&t, 0, sizeof t);
  cr_assert_eq(uv_loop_init(&t.loop), 0);
  char table[64], lease[64];
  kt_unique_name(table, sizeof table, "vlease");
  kt_unique_name(lease, sizeof lease, "vlease_tab");
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY)", table);
  kt_pg_execf("INSERT INTO \"%s\" SELECT generate_series(1, 10)", table);
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  cr_expect_eq(o.leader_kind, KEEL_VERIFY_LEADER_LEASE);
  cr_expect_eq(o.leader_ttl_ms, 0);
  o.conninfo = kt_pg_conninfo();
  o.table = table;
  o.validate = count_validator;
  o.leader_lock = true;
  o.leader_table = lease;
  o.leader_ttl_ms = 1500;
  o.interval_ms = 50;
  const char *why = NULL;
  keel_verify_opts bad = o;
  bad.leader_ttl_ms = 50;
  cr_expect_eq(keel_verify_validate_opts(&bad, &why), UV_EINVAL);
  bad = o;
  bad.leader_margin_ms = 750;
  cr_expect_eq(keel_verify_validate_opts(&bad, &why), UV_EINVAL);
  bad = o;
  bad.leader_table = "a.b.c";
  cr_expect_eq(keel_verify_validate_opts(&bad, &why), UV_EINVAL);

  cr_assert_eq(keel_verify_new(&t.loop, &o, &t.a), 0);
  cr_assert_eq(keel_verify_new(&t.loop, &o, &t.b), 0);
  cr_assert_eq(keel_verify_start(t.a), 0);
  cr_assert(kt_wait_for(&t.loop, a_completed, &t, 10000), "%s", keel_verify_last_error(t.a));
  cr_assert_eq(keel_verify_start(t.b), 0);
  cr_assert(kt_wait_for(&t.loop, b_refused, &t, 10000), "%s", keel_verify_last_error(t.b));
  keel_verify_stats a, b;
  keel_verify_get_stats(t.a, &a);
  keel_verify_get_stats(t.b, &b);
  cr_expect(a.leader);
  cr_expect_not(b.leader);
  cr_expect_eq(b.runs_started, 0, "the follower ran");
  cr_expect_eq(a.leader_changes, 1);
  cr_expect_eq(a.leases_lost, 0);
  cr_expect_eq(b.fence, 0);
  char fence[32];
  snprintf(fence, sizeof fence, "%" PRIu64, a.fence);
  char *row = kt_pg_scalarf(
      "SELECT fence || ' ' || (expires_at > clock_timestamp()) FROM \"%s\" "
      "WHERE name = '%s'",
      lease, table);
  char expect[64];
  snprintf(expect, sizeof expect, "%s true", fence);
  cr_expect_str_eq(row, expect);
  free(row);
  /* the leader gives the lease up when it closes: the other takes over at
   * its next tick, with the next fence */
  uint64_t a_fence = a.fence;
  keel_verify_close(t.a, on_closed, &t);
  cr_assert(kt_wait_for(&t.loop, closed_one, &t, 5000));
  cr_assert(kt_wait_for(&t.loop, b_completed, &t, 10000), "%s", keel_verify_last_error(t.b));
  keel_verify_get_stats(t.b, &b);
  cr_expect(b.leader);
  cr_expect_eq(b.fence, a_fence + 1);
  cr_expect_eq(b.leader_changes, 1);
  keel_verify_close(t.b, on_closed, &t);
  cr_assert(kt_wait_for(&t.loop, closed_two, &t, 5000));
  kt_loop_finish(&t.loop);
  /* closed: given up, so expired now */
  char *held = kt_pg_scalarf("SELECT expires_at > clock_timestamp() FROM \"%s\" WHERE name = '%s'",
                             lease, table);
  cr_expect_str_eq(held, "f");
  free(held);
  kt_pg_execf("DROP TABLE \"%s\"; DROP TABLE \"%s\"", table, lease);
}

/* ---- fix-up fence conditions ------------------------------------------------------ */

typedef struct fencefx {
  uv_loop_t loop;
  keel_verify *v;
  char cond[1024];
  uint64_t fence;
  int runs;
  int status;
  bool closed;
} fencefx;

static bool always_invalid(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)row, (void)data;
  return false;
}

static void grab_fence(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                       void *data) {
  (void)v, (void)row;
  fencefx *f = data;
  f->fence = keel_verify_fix_fence(fix);
  int n = keel_verify_fix_fence_sql(fix, f->cond, sizeof f->cond);
  cr_expect_gt(n, 0);
  cr_expect_lt((size_t)n, sizeof f->cond);
  char tiny[8];
  cr_expect_eq(keel_verify_fix_fence_sql(fix, tiny, sizeof tiny), n, "length as snprintf");
  cr_expect_eq(strlen(tiny), (size_t)n < sizeof tiny ? (size_t)n : sizeof tiny - 1);
  cr_expect_eq(keel_verify_fix_fence_sql(fix, NULL, 0), n);
  cr_expect_eq(keel_verify_fix_fence_sql(fix, NULL, 4), UV_EINVAL);
  keel_verify_fix_done(fix, 0);
}

static void fence_run_done(keel_verify *v, int status, void *data) {
  (void)v;
  fencefx *f = data;
  f->runs++;
  f->status = status;
}

static bool fence_ran(void *ctx) {
  return ((fencefx *)ctx)->runs >= 1;
}

static void fence_closed(void *obj, void *data) {
  (void)obj;
  ((fencefx *)data)->closed = true;
}

static bool fence_is_closed(void *ctx) {
  return ((fencefx *)ctx)->closed;
}

static void fence_case(bool leader_lock, keel_verify_leader_kind kind, const char *job) {
  fencefx f;
  memset(&f, 0, sizeof f);
  cr_assert_eq(uv_loop_init(&f.loop), 0);
  char table[64];
  kt_unique_name(table, sizeof table, "vfence");
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY)", table);
  kt_pg_execf("INSERT INTO \"%s\" VALUES (1)", table);
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.table = table;
  o.job_name = job;
  o.validate = always_invalid;
  o.fix = grab_fence;
  o.on_run_done = fence_run_done;
  o.leader_lock = leader_lock;
  o.leader_kind = kind;
  o.data = &f;
  cr_assert_eq(keel_verify_new(&f.loop, &o, &f.v), 0);
  cr_assert_eq(keel_verify_run_now(f.v), 0);
  cr_assert(kt_wait_for(&f.loop, fence_ran, &f, 10000));
  cr_expect_eq(f.status, 0, "%s", keel_verify_last_error(f.v));
  if (leader_lock && kind == KEEL_VERIFY_LEADER_LEASE) {
    cr_expect_gt(f.fence, 0);
    cr_expect(strstr(f.cond, "FOR SHARE") != NULL, "%s", f.cond);
    /* the lease is given up at the end of the run (not started): false
     * once that statement ran */
    char *r = NULL;
    for (int i = 0; i < 100; i++) {
      free(r);
      r = kt_pg_scalarf("SELECT %s", f.cond);
      if (strcmp(r, "f") == 0) break;
      uv_run(&f.loop, UV_RUN_NOWAIT);
      sleep_ms(50);
    }
    cr_expect_str_eq(r, "f", "%s", f.cond);
    free(r);
  } else {
    cr_expect_eq(f.fence, 0);
    cr_expect_str_eq(f.cond, "true");
  }
  keel_verify_close(f.v, fence_closed, &f);
  cr_assert(kt_wait_for(&f.loop, fence_is_closed, &f, 5000));
  kt_loop_finish(&f.loop);
  kt_pg_execf("DROP TABLE \"%s\"", table);
}

Test(verify_lease, fix_fence_sql) {
  fence_case(true, KEEL_VERIFY_LEADER_LEASE, "job 'quoted' \\ name");
  fence_case(false, KEEL_VERIFY_LEADER_LEASE, NULL);
  fence_case(true, KEEL_VERIFY_LEADER_ADVISORY, NULL);
  cr_expect_eq(keel_verify_fix_fence(NULL), 0);
  char buf[8];
  cr_expect_eq(keel_verify_fix_fence_sql(NULL, buf, sizeof buf), UV_EINVAL);
}

/* ---- processes -------------------------------------------------------------------- */

/* What the children share (set before fork). */
static struct {
  char conninfo[512]; /* through the pooler */
  char table[48];     /* the verified table: every row invalid */
  char log[64];       /* fenced writes: pid, run, fence, t */
  char marks[64];     /* unfenced: a fix-up began (pid, fence) */
  char outcome[64];   /* unfenced: pid, fence, rows the fenced write affected */
  char runs[64];      /* unfenced: pid, status of each run */
  char lease[64];
  int role;              /* 0 overlap worker, 1 stalled leader, 2 taker */
  uint64_t lifetime_ms;  /* the child exits after it */
  uint64_t fix_delay_ms; /* role 1: between the fix-up's start and its fenced write */
} g;

typedef struct child {
  uv_loop_t loop;
  keel_pg_pool *pool;
  keel_verify *v;
  uv_timer_t restart, life;
  int completed;
  bool closing;
} child;

static child C;

typedef struct pending_fix {
  keel_verify_fix *fix;
  uv_timer_t timer;
  uint64_t fence;
  char sql[2048];
} pending_fix;

static void noop_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c, (void)status, (void)res, (void)data;
}

static void pending_closed(uv_handle_t *h) {
  free(h->data);
}

static void fenced_written(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  pending_fix *p = data;
  if (status == 0 && g.role != 0 && !C.closing) {
    char sql[256];
    snprintf(sql, sizeof sql, "INSERT INTO \"%s\" VALUES (%d, %" PRIu64 ", %" PRIu64 ")", g.outcome,
             (int)getpid(), p->fence, keel_pg_result_affected(res));
    keel_pg_pool_query(C.pool, sql, 0, NULL, noop_cb, NULL);
  }
  (void)keel_verify_fix_done(p->fix, status == 0 ? 0 : status);
  p->timer.data = p;
  uv_close((uv_handle_t *)&p->timer, pending_closed);
}

static void send_fenced(pending_fix *p) {
  if (C.closing || keel_pg_pool_query(C.pool, p->sql, 0, NULL, fenced_written, p) != 0) {
    (void)keel_verify_fix_done(p->fix, KEEL_ECONN);
    p->timer.data = p;
    uv_close((uv_handle_t *)&p->timer, pending_closed);
  }
}

static void delayed_write(uv_timer_t *t) {
  send_fenced(t->data);
}

/* Every fix-up writes one fenced row stamped with the server's clock; the
 * condition is built when the fix-up begins (as a fix-up that prepares its
 * statement would). */
static void child_fix(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                      void *data) {
  (void)row, (void)data;
  keel_verify_stats st;
  keel_verify_get_stats(v, &st);
  pending_fix *p = calloc(1, sizeof *p);
  p->fix = fix;
  p->fence = keel_verify_fix_fence(fix);
  char cond[1024];
  keel_verify_fix_fence_sql(fix, cond, sizeof cond);
  snprintf(p->sql, sizeof p->sql,
           "INSERT INTO \"%s\" (pid, run, fence, t) SELECT %d, %" PRIu64 ", %" PRIu64
           ", clock_timestamp() FROM pg_sleep(0.005) WHERE %s",
           g.log, (int)getpid(), st.runs_started, p->fence, cond);
  uv_timer_init(&C.loop, &p->timer);
  p->timer.data = p;
  if (g.role == 1) {
    char sql[256];
    snprintf(sql, sizeof sql, "INSERT INTO \"%s\" VALUES (%d, %" PRIu64 ")", g.marks, (int)getpid(),
             p->fence);
    keel_pg_pool_query(C.pool, sql, 0, NULL, noop_cb, NULL);
    uv_timer_start(&p->timer, delayed_write, g.fix_delay_ms, 0);
  } else {
    send_fenced(p);
  }
}

static void restart_cb(uv_timer_t *t) {
  (void)t;
  if (!C.closing) keel_verify_start(C.v);
}

static void pause_cb(uv_timer_t *t) {
  (void)t;
  if (C.closing) return;
  keel_verify_stop(C.v); /* gives the lease up once the run is over */
  uv_timer_start(&C.restart, restart_cb, 250, 0);
}

static void child_run_done(keel_verify *v, int status, void *data) {
  (void)v, (void)data;
  if (C.closing) return; /* the pool is closed too */
  char sql[256];
  snprintf(sql, sizeof sql, "INSERT INTO \"%s\" VALUES (%d, %d)", g.runs, (int)getpid(), status);
  keel_pg_pool_query(C.pool, sql, 0, NULL, noop_cb, NULL);
  /* overlap workers hand over after every third completed run */
  if (g.role == 0 && status == 0 && ++C.completed % 3 == 0 && !C.closing)
    uv_timer_start(&C.restart, pause_cb, 0, 0);
}

static void life_cb(uv_timer_t *t) {
  (void)t;
  C.closing = true;
  keel_verify_close(C.v, NULL, NULL);
  keel_pg_pool_close(C.pool, NULL, NULL);
  uv_close((uv_handle_t *)&C.restart, NULL);
  uv_close((uv_handle_t *)&C.life, NULL);
}

static void child_main(void) {
  memset(&C, 0, sizeof C);
  if (uv_loop_init(&C.loop) != 0) _exit(3);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = g.conninfo;
  po.size = 3;
  if (keel_pg_pool_new(&C.loop, &po, &C.pool) != 0) _exit(4);
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.pool = C.pool;
  o.table = g.table;
  o.validate = always_invalid;
  o.fix = child_fix;
  o.fix_concurrency = 1;
  o.fix_max_retries = 0;
  o.fix_timeout_ms = 0;
  o.on_run_done = child_run_done;
  o.leader_lock = true;
  o.leader_table = g.lease;
  o.leader_ttl_ms = 900;
  o.interval_ms = 60;
  o.run_timeout_ms = 20000;
  if (keel_verify_new(&C.loop, &o, &C.v) != 0) _exit(5);
  uv_timer_init(&C.loop, &C.restart);
  uv_timer_init(&C.loop, &C.life);
  uv_timer_start(&C.life, life_cb, g.lifetime_ms, 0);
  keel_verify_start(C.v);
  uv_run(&C.loop, UV_RUN_DEFAULT);
  _exit(uv_loop_close(&C.loop) == 0 ? 0 : 6);
}

static pid_t spawn(int role) {
  g.role = role;
  fflush(NULL);
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) child_main();
  return pid;
}

static void setup_tables(int rows) {
  kt_unique_name(g.table, sizeof g.table, "vlp");
  snprintf(g.log, sizeof g.log, "%s_log", g.table);
  snprintf(g.marks, sizeof g.marks, "%s_marks", g.table);
  snprintf(g.outcome, sizeof g.outcome, "%s_out", g.table);
  snprintf(g.runs, sizeof g.runs, "%s_runs", g.table);
  snprintf(g.lease, sizeof g.lease, "%s_lease", g.table);
  kt_pg_execf("CREATE TABLE \"%s\" (id int PRIMARY KEY)", g.table);
  kt_pg_execf("INSERT INTO \"%s\" SELECT generate_series(1, %d)", g.table, rows);
  kt_pg_execf("CREATE TABLE \"%s\" (pid int, run bigint, fence bigint, t timestamptz)", g.log);
  kt_pg_execf("CREATE TABLE \"%s\" (pid int, fence bigint)", g.marks);
  kt_pg_execf("CREATE TABLE \"%s\" (pid int, fence bigint, affected bigint)", g.outcome);
  kt_pg_execf("CREATE TABLE \"%s\" (pid int, status int)", g.runs);
}

static void drop_tables(void) {
  kt_pg_execf("DROP TABLE IF EXISTS \"%s\", \"%s\", \"%s\", \"%s\", \"%s\", \"%s\"", g.table, g.log,
              g.marks, g.outcome, g.runs, g.lease);
}

/* ---- our own PgBouncer, whose server connections this test kills ------------------ */

typedef struct bouncer {
  char dir[64];
  int port;
} bouncer;

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  socklen_t len = sizeof a;
  getsockname(fd, (struct sockaddr *)&a, &len);
  close(fd);
  return ntohs(a.sin_port);
}

static int pg_port(void) {
  const char *p = strstr(kt_pg_direct_conninfo(), "port=");
  cr_assert_not_null(p);
  return (int)strtol(p + 5, NULL, 10);
}

/* As scripts/lib.sh's keel_start_pgbouncer: transaction mode, run as the
 * postgres user when root (pgbouncer refuses root). */
static void bouncer_start(bouncer *b) {
  snprintf(b->dir, sizeof b->dir, "/tmp/kt_pgb_XXXXXX");
  cr_assert_not_null(mkdtemp(b->dir));
  chmod(b->dir, 0777);
  b->port = free_port();
  char path[128];
  snprintf(path, sizeof path, "%s/users.txt", b->dir);
  FILE *f = fopen(path, "w");
  cr_assert_not_null(f);
  fprintf(f, "\"postgres\" \"\"\n");
  fclose(f);
  snprintf(path, sizeof path, "%s/pgbouncer.ini", b->dir);
  f = fopen(path, "w");
  cr_assert_not_null(f);
  fprintf(f,
          "[databases]\n* = host=127.0.0.1 port=%d\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
          "listen_port = %d\nunix_socket_dir =\nauth_type = trust\nauth_file = %s/users.txt\n"
          "pool_mode = transaction\nmax_client_conn = 200\ndefault_pool_size = 4\n"
          "server_reset_query =\nignore_startup_parameters = extra_float_digits,options\n"
          "pidfile = %s/pgbouncer.pid\nlogfile = %s/pgbouncer.log\nadmin_users = postgres\n",
          pg_port(), b->port, b->dir, b->dir, b->dir);
  fclose(f);
  char cmd[512];
  if (geteuid() == 0)
    snprintf(
        cmd, sizeof cmd,
        "chown -R postgres:postgres %s && runuser -u postgres -- pgbouncer -d %s/pgbouncer.ini",
        b->dir, b->dir);
  else
    snprintf(cmd, sizeof cmd, "pgbouncer -d %s/pgbouncer.ini", b->dir);
  cr_assert_eq(system(cmd), 0, "cannot start pgbouncer: %s", cmd);
  char ci[256];
  snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=postgres dbname=postgres", b->port);
  for (int i = 0; i < 200 && PQping(ci) != PQPING_OK; i++) sleep_ms(25);
  cr_assert_eq(PQping(ci), PQPING_OK, "pgbouncer does not answer");
}

static void bouncer_stop(bouncer *b) {
  char path[128];
  snprintf(path, sizeof path, "%s/pgbouncer.pid", b->dir);
  FILE *f = fopen(path, "r");
  long pid = 0;
  if (f != NULL) {
    if (fscanf(f, "%ld", &pid) != 1) pid = 0;
    fclose(f);
  }
  if (pid > 0) {
    kill((pid_t)pid, SIGTERM);
    for (int i = 0; i < 200 && kill((pid_t)pid, 0) == 0; i++) sleep_ms(25);
  }
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", b->dir);
  if (system(cmd) != 0) {
  }
}

/* Kills every server connection of our PgBouncer (SHOW SERVERS gives their
 * backends' pids). Returns how many were killed. */
static int kill_bouncer_servers(const bouncer *b) {
  char ci[256];
  snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=postgres dbname=pgbouncer", b->port);
  PGconn *admin = PQconnectdb(ci);
  if (PQstatus(admin) != CONNECTION_OK) {
    PQfinish(admin);
    return 0;
  }
  PGresult *r = PQexec(admin, "SHOW SERVERS");
  int killed = 0;
  if (PQresultStatus(r) == PGRES_TUPLES_OK) {
    int col = PQfnumber(r, "remote_pid");
    char list[2048] = "0";
    size_t at = 1;
    for (int i = 0; col >= 0 && i < PQntuples(r); i++)
      at += (size_t)snprintf(list + at, sizeof list - at, ",%s", PQgetvalue(r, i, col));
    char *n = kt_pg_scalarf(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid IN (%s)", list);
    killed = n ? atoi(n) : 0;
    free(n);
  }
  PQclear(r);
  PQfinish(admin);
  return killed;
}

static int wait_child(pid_t pid) {
  int st = 0;
  for (int i = 0; i < 1200; i++) {
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    sleep_ms(25);
  }
  kill(pid, SIGKILL);
  waitpid(pid, &st, 0);
  return -1;
}

Test(verify_lease, pooler_runs_never_overlap, .timeout = 120) {
  if (system("command -v pgbouncer >/dev/null 2>&1") != 0)
    cr_skip_test("pgbouncer is not installed");
  bouncer b;
  bouncer_start(&b);
  memset(&g, 0, sizeof g);
  snprintf(g.conninfo, sizeof g.conninfo,
           "host=127.0.0.1 port=%d user=postgres dbname=postgres connect_timeout=5", b.port);
  setup_tables(4);
  g.lifetime_ms = 8000;
  pid_t p1 = spawn(0), p2 = spawn(0);
  int kills = 0, rounds = 0;
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  do {
    sleep_ms(350);
    kills += kill_bouncer_servers(&b);
    rounds++;
    clock_gettime(CLOCK_MONOTONIC, &now);
  } while ((now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000 < 7000);
  cr_expect_eq(wait_child(p1), 0, "child 1 did not end cleanly");
  cr_expect_eq(wait_child(p2), 0, "child 2 did not end cleanly");
  cr_expect_geq(kills, 3, "the pooler's server connections were not killed (%d)", kills);

  /* the run intervals: first to last fenced write of each (process, run) */
  static const char intervals[] =
      "WITH r AS (SELECT pid, run, min(t) s, max(t) e FROM \"%s\" GROUP BY pid, run) ";
  char sql[1024];
  snprintf(sql, sizeof sql,
           "%s SELECT count(*) FROM r a JOIN r b ON (a.pid, a.run) < (b.pid, b.run) AND "
           "a.s <= b.e AND b.s <= a.e",
           intervals);
  cr_expect_eq(scalar_long(sql, g.log), 0, "runs overlapped");
  snprintf(sql, sizeof sql, "%s SELECT count(*) FROM r", intervals);
  long runs = scalar_long(sql, g.log);
  cr_expect_geq(runs, 4, "too few runs wrote (%ld)", runs);
  cr_expect_eq(scalar_long("SELECT count(DISTINCT pid) FROM \"%s\"", g.log), 2,
               "leadership never changed hands");
  cr_expect_eq(scalar_long("SELECT count(*) FROM (SELECT fence FROM \"%s\" GROUP BY fence "
                           "HAVING count(DISTINCT pid) > 1) x",
                           g.log),
               0, "two processes wrote under one fence");
  cr_expect_geq(scalar_long("SELECT count(DISTINCT fence) FROM \"%s\"", g.log), 2);
  drop_tables();
  bouncer_stop(&b);
}

static long wait_scalar(const char *fmt, const char *table, long want_at_least, long timeout_ms) {
  long v = -1;
  for (long waited = 0; waited <= timeout_ms; waited += 50) {
    v = scalar_long(fmt, table);
    if (v >= want_at_least) return v;
    sleep_ms(50);
  }
  return v;
}

Test(verify_lease, stalled_leader_is_fenced, .timeout = 120) {
  memset(&g, 0, sizeof g);
  snprintf(g.conninfo, sizeof g.conninfo, "%s", kt_pg_pooler_conninfo());
  setup_tables(1);
  g.lifetime_ms = 60000;
  g.fix_delay_ms = 3000;
  pid_t a = spawn(1);
  char q[256];
  snprintf(q, sizeof q, "SELECT coalesce(max(fence), -1) FROM \"%%s\" WHERE pid = %d", (int)a);
  long a_fence = wait_scalar(q, g.marks, 1, 15000);
  cr_assert_geq(a_fence, 1, "the first process never began a fix-up");
  kill(a, SIGSTOP);
  /* past the ttl (900 ms) from its last renewal: the lease expires on the
   * server */
  sleep_ms(1800);
  g.fix_delay_ms = 0;
  pid_t bpid = spawn(2);
  snprintf(q, sizeof q, "SELECT coalesce(max(affected), -1) FROM \"%%s\" WHERE pid = %d",
           (int)bpid);
  cr_expect_eq(wait_scalar(q, g.outcome, 1, 15000), 1, "the second process did not take over");
  snprintf(q, sizeof q, "SELECT coalesce(max(fence), -1) FROM \"%%s\" WHERE pid = %d", (int)bpid);
  long b_fence = scalar_long(q, g.outcome);
  cr_expect_gt(b_fence, a_fence, "the takeover did not raise the fence");
  snprintf(q, sizeof q,
           "SELECT count(*) FROM \"%%s\" WHERE split_part(owner, '-', 1)::int = %d AND "
           "expires_at > clock_timestamp()",
           (int)bpid);
  cr_expect_eq(scalar_long(q, g.lease), 1, "the lease is not the second process's");

  kill(a, SIGCONT);
  /* resumed, the first one's fenced write (prepared under its old fence)
   * changes nothing, and its run does not complete */
  snprintf(q, sizeof q, "SELECT count(*) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_eq(wait_scalar(q, g.outcome, 1, 15000), 1, "the resumed leader never wrote");
  snprintf(q, sizeof q, "SELECT coalesce(max(affected), -1) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_eq(scalar_long(q, g.outcome), 0, "the stalled leader's fenced write took effect");
  snprintf(q, sizeof q, "SELECT count(*) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_eq(scalar_long(q, g.log), 0, "the stalled leader wrote under its old fence");
  snprintf(q, sizeof q, "SELECT count(*) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_geq(wait_scalar(q, g.runs, 1, 10000), 1, "the stalled leader's run never ended");
  snprintf(q, sizeof q, "SELECT coalesce(min(status), 0) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_eq(scalar_long(q, g.runs), KEEL_ENOTLEADER, "its run did not end as not leader");
  snprintf(q, sizeof q, "SELECT count(*) FROM \"%%s\" WHERE pid = %d AND status = 0", (int)a);
  cr_expect_eq(scalar_long(q, g.runs), 0, "the stalled leader completed a run");
  /* and it does not lead again while the second renews */
  sleep_ms(1000);
  snprintf(q, sizeof q, "SELECT count(*) FROM \"%%s\" WHERE pid = %d", (int)a);
  cr_expect_eq(scalar_long(q, g.marks), 1, "the stalled leader ran again");

  kill(a, SIGKILL);
  kill(bpid, SIGKILL);
  int st;
  waitpid(a, &st, 0);
  waitpid(bpid, &st, 0);
  drop_tables();
}
