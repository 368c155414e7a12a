/*
 * examples/pgqueue.c — the seed's user onboarding on the durable queue: an
 * enqueuer process and a worker process sharing one database.
 *
 * The enqueuer (the parent) signs users up: each sign-up inserts the user's
 * row AND its onboarding job in one transaction (keel_pg_pool_transaction +
 * keel_pgqueue_enqueue on the transaction's connection), so a job exists
 * exactly when the user does. Paying users get priority 10. A unique key per
 * user makes a repeated sign-up report the existing job instead of queueing
 * a second one. The worker (a forked child) onboards each user — create the
 * profile, set preferences, send the welcome email — idempotently (upserts),
 * because a job may run more than once after a crash. The email service fails
 * the first attempt for every third user: the job is retried with backoff.
 *
 * Run: ./pgqueue            12 users, exits 0 when all were onboarded
 *      ./pgqueue --forever  a sign-up every 200 ms until Ctrl-C
 * Reads the conninfo from KEEL_PG, falling back to KEEL_TEST_PG.
 */
#include <keel.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define USERS 12

static char schema[64];
static const char *conninfo;

/* ---- the worker process ----------------------------------------------------- */

typedef struct worker {
  keel_pgqueue *q;
  keel_pg *db;
  int onboarded;
  bool forever;
} worker;

typedef struct step {
  worker *w;
  keel_pgqueue_job *job;
  int user;
} step;

static void step_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  step *s = data;
  if (status != 0) {
    keel_pgqueue_job_fail(s->job, status, keel_pg_last_error(c));
  } else if (s->user % 3 == 0 && keel_pgqueue_job_attempt(s->job) == 1) {
    /* the welcome email service is flaky: retried with the queue's backoff */
    keel_pgqueue_job_fail(s->job, UV_ECONNRESET, "email service: connection reset");
  } else {
    printf("worker: onboarded user %d (attempt %u)\n", s->user, keel_pgqueue_job_attempt(s->job));
    keel_pgqueue_job_done(s->job, 0);
    s->w->onboarded++;
    if (!s->w->forever && s->w->onboarded == USERS) {
      keel_pgqueue_close(s->w->q, NULL, NULL);
      keel_pg_close(s->w->db, NULL, NULL);
    }
  }
  free(s);
}

static void onboard(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  (void)q;
  worker *w = data;
  const char *p = strstr(keel_pgqueue_job_payload(job), "\"user\":");
  step *s = malloc(sizeof *s);
  if (p == NULL || s == NULL) {
    free(s);
    keel_pgqueue_job_fail(job, UV_EINVAL, "payload without a user"); /* not retried */
    return;
  }
  *s = (step){w, job, atoi(p + 7)};
  /* profile and preferences: idempotent upserts, one statement */
  char sql[512], id[16];
  snprintf(id, sizeof id, "%d", s->user);
  snprintf(
      sql, sizeof sql,
      "WITH p AS (INSERT INTO %s.profiles (user_id, display_name) VALUES ($1::int, 'user ' || $1)"
      " ON CONFLICT (user_id) DO NOTHING)"
      " INSERT INTO %s.preferences (user_id, theme) VALUES ($1::int, 'light')"
      " ON CONFLICT (user_id) DO NOTHING",
      schema, schema);
  const char *params[] = {id};
  if (keel_pg_query(w->db, sql, 1, params, step_done, s) != 0) {
    keel_pgqueue_job_fail(job, KEEL_ECONN, keel_pg_last_error(w->db));
    free(s);
  }
}

static int run_worker(bool forever) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  worker w = {0};
  w.forever = forever;
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = conninfo;
  if (keel_pg_new(&loop, &po, &w.db) != 0) return 1;
  keel_pgqueue_opts o;
  keel_pgqueue_opts_init(&o);
  o.conninfo = conninfo;
  o.schema = schema;
  o.queue = "onboarding";
  o.process = onboard;
  o.data = &w;
  o.concurrency = 2;
  o.poll_ms = 200;
  keel_backoff_exponential(&o.retry_backoff, 100, 2.0, 2000);
  if (keel_pgqueue_new(&loop, &o, &w.q) != 0) return 1;
  uv_run(&loop, UV_RUN_DEFAULT);
  return uv_loop_close(&loop) == 0 && w.onboarded >= USERS ? 0 : 1;
}

/* ---- the enqueuer (sign-ups) ---------------------------------------------------- */

typedef struct app {
  uv_loop_t *loop;
  keel_pg_pool *pool;
  keel_pgqueue *q; /* enqueue only */
  int next_user, signed_up, ready;
  bool forever;
  uv_timer_t tick;
} app;

typedef struct signup {
  app *a;
  int user;
} signup;

static void queued(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs, size_t n,
                   void *data) {
  signup *s = data;
  if (status == 0 && n == 1)
    printf("enqueuer: user %d -> job %lld%s\n", s->user, (long long)jobs[0].id,
           jobs[0].existed ? " (already queued)" : "");
  else
    fprintf(stderr, "enqueue: %s\n", keel_pgqueue_last_error(q));
}

static void signup_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  signup *s = data;
  char sql[256], id[16], email[64], key[32], payload[96];
  snprintf(id, sizeof id, "%d", s->user);
  snprintf(email, sizeof email, "user%d@example.com", s->user);
  snprintf(sql, sizeof sql, "INSERT INTO %s.users (id, email) VALUES ($1::int, $2)", schema);
  const char *params[] = {id, email};
  keel_pg_query(conn, sql, 2, params, NULL, NULL);
  keel_pgqueue_job_opts j;
  keel_pgqueue_job_opts_init(&j);
  snprintf(key, sizeof key, "onboard-%d", s->user);
  snprintf(payload, sizeof payload, "{\"user\":%d,\"email\":\"%s\"}", s->user, email);
  j.queue = "onboarding";
  j.kind = "onboard";
  j.payload = payload;
  j.unique_key = key;
  j.priority = s->user % 4 == 0 ? 10 : 0; /* paying customers first */
  int rc = keel_pgqueue_enqueue(s->a->q, conn, &j, 1, queued, s);
  keel_pg_tx_finish(tx, rc); /* commit the user and the job together */
}

static void signup_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool, (void)sqlstate;
  signup *s = data;
  if (status == 0)
    s->a->signed_up++;
  else
    fprintf(stderr, "sign-up of user %d: %s\n", s->user, keel_strerror(status));
  free(s);
}

static void sign_up_next(uv_timer_t *t) {
  app *a = t->data;
  if (!a->forever && a->next_user >= USERS) {
    uv_timer_stop(t);
    return;
  }
  signup *s = malloc(sizeof *s);
  if (s == NULL) return;
  *s = (signup){a, ++a->next_user};
  if (keel_pg_pool_transaction(a->pool, KEEL_PG_READ_COMMITTED, signup_body, signup_done, s) != 0)
    free(s);
}

static void q_ready(keel_pgqueue *q, int status, void *data) {
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "schema: %s\n", keel_pgqueue_last_error(q));
    return;
  }
  a->ready = 1;
}

static int blocking_sql(uv_loop_t *loop, keel_pg_pool *pool, const char *sql);

int main(int argc, char **argv) {
  bool forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || !*conninfo) conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL || !*conninfo) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL conninfo\n");
    return 2;
  }
  snprintf(schema, sizeof schema, "keel_example_pgq_%d", (int)getpid());
  uv_loop_t *loop = uv_default_loop();
  app a = {.loop = loop, .forever = forever};
  keel_pg_pool_opts pool_opts;
  keel_pg_pool_opts_init(&pool_opts);
  pool_opts.conn.conninfo = conninfo;
  pool_opts.size = 2;
  if (keel_pg_pool_new(loop, &pool_opts, &a.pool) != 0) return 1;
  /* the queue installs its own schema; the application's tables live beside it */
  keel_pgqueue_opts o;
  keel_pgqueue_opts_init(&o);
  o.conninfo = conninfo;
  o.schema = schema;
  o.queue = "onboarding";
  o.on_ready = q_ready;
  o.data = &a;
  if (keel_pgqueue_new(loop, &o, &a.q) != 0) return 1;
  while (!a.ready) uv_run(loop, UV_RUN_ONCE);
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s.users (id int PRIMARY KEY, email text);"
           "CREATE TABLE %s.profiles (user_id int PRIMARY KEY, display_name text);"
           "CREATE TABLE %s.preferences (user_id int PRIMARY KEY, theme text)",
           schema, schema, schema);
  if (blocking_sql(loop, a.pool, sql) != 0) return 1;

  fflush(stdout);
  pid_t child = fork();
  if (child == 0) {
    int rc = run_worker(forever);
    fflush(stdout);
    _exit(rc);
  }

  uv_timer_init(loop, &a.tick);
  a.tick.data = &a;
  uv_timer_start(&a.tick, sign_up_next, 0, forever ? 200 : 20);
  while (a.signed_up < USERS || forever) uv_run(loop, UV_RUN_ONCE);
  int status = 0;
  waitpid(child, &status, 0);
  bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE", schema);
  blocking_sql(loop, a.pool, sql);
  uv_close((uv_handle_t *)&a.tick, NULL);
  keel_pgqueue_close(a.q, NULL, NULL);
  keel_pg_pool_close(a.pool, NULL, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  printf("%s: %d users signed up and onboarded\n", ok ? "ok" : "FAILED", a.signed_up);
  return ok && uv_loop_close(loop) == 0 ? 0 : 1;
}

/* Runs ';'-separated statements one by one (keel sends each with the
 * extended protocol, one statement per message) and waits for them. */
typedef struct waiter {
  int pending, failed;
} waiter;

static void one_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  waiter *w = data;
  w->pending--;
  if (status != 0) {
    w->failed++;
    fprintf(stderr, "%s\n", keel_pg_last_error(c));
  }
}

static int blocking_sql(uv_loop_t *loop, keel_pg_pool *pool, const char *sql) {
  waiter w = {0, 0};
  char buf[512];
  snprintf(buf, sizeof buf, "%s", sql);
  for (char *stmt = buf, *end; stmt != NULL && *stmt; stmt = end) {
    end = strchr(stmt, ';');
    if (end != NULL) *end++ = '\0';
    w.pending++;
    if (keel_pg_pool_query(pool, stmt, 0, NULL, one_done, &w) != 0) return 1;
    while (w.pending > 0) uv_run(loop, UV_RUN_ONCE);
  }
  return w.failed ? 1 : 0;
}
