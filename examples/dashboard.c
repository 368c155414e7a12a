/*
 * examples/dashboard.c — a small service that uses every keel module at
 * once and shows them on keel's dashboard (keel/serve.h).
 *
 * - a breaker ("payments") around a flaky call that has outages;
 * - a priority queue ("emails") whose jobs fail now and then and are retried;
 * - a pool ("main"), a connection ("admin") and an integrity context
 *   ("cards") that inserts cards with unique slugs (collisions included);
 * - a listener ("orders") on a table the demo writes to;
 * - a verifier ("orders-check") that walks that table every 5 s and fixes
 *   negative amounts;
 * - retry runners ("sync-N") that come and go;
 * - a policy pipeline ("api": rate limit, retry, timeout) around a flaky
 *   call, and its rate limiter ("api");
 * - a durable queue ("reports", keel/pgqueue.h) fed and worked here, jobs
 *   failing now and then and retried;
 * - a saga ("checkout": reserve, then charge, which refuses one in five:
 *   the reservation is compensated);
 * - with Redis (KEEL_REDIS or KEEL_TEST_REDIS, host:port or a URL): the
 *   client ("cache"), which also takes and releases a lock every 2 s, a
 *   shared rate limiter ("tenants") and an idempotency store ("payments").
 *
 * The first line it prints is the dashboard's URL. Open it in a browser;
 * /metrics and /stats.json are next to it.
 *
 * Run: KEEL_PG="host=... dbname=..." [KEEL_REDIS=host:port] ./dashboard
 *        [--seconds N] [--forever]
 *        [--port P] [--token T]
 *      default: 3 seconds, then checks that /metrics showed every kind and
 *      exits 0. SIGUSR1 forces the payments breaker open, SIGUSR2 stops
 *      calling it (so that its counters hold still; the tests use both).
 */
#include <keel.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct app {
  uv_loop_t *loop;
  bool forever, closing;
  keel_serve *server;
  keel_pg_pool *pool;
  keel_pg *admin;
  keel_integrity *cards;
  keel_listener *listener;
  keel_verify *verifier;
  keel_breaker *payments;
  keel_queue *emails;
  keel_retry *sync;
  unsigned syncs;
  keel_ratelimit *api_rl;
  keel_pipeline *api;
  keel_pgqueue *reports;
  keel_saga *checkout;
  keel_redis *cache;
  keel_ratelimit_redis *tenants;
  keel_idem *payments_idem;
  keel_redis_lock *lock; /* held or being taken; NULL when free */
  int redis_users;       /* tenants and payments_idem still closing */
  uint64_t idem_seq;
  char schema[64];
  uv_timer_t tick, stop;
  uv_signal_t sigint, sigusr1, sigusr2;
  uint64_t ticks, changes_seen, outage_until;
  char orders[64], cards_table[64], fix_sql[160], sql[256];
  bool metrics_ok;
  bool quiet; /* SIGUSR2: no more payment calls */
  int failures;
} app;

static unsigned rnd(unsigned n) {
  return (unsigned)rand() % n;
}

static const char *sql(app *a, const char *fmt, const char *table) {
  snprintf(a->sql, sizeof a->sql, fmt, table);
  return a->sql;
}

static void ignore(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res, (void)data;
  if (status != 0 && status != UV_ECANCELED && status != KEEL_ECLOSING)
    fprintf(stderr, "statement failed: %s\n", keel_pg_last_error(c));
}

/* ---- breaker around a flaky call -------------------------------------- */

typedef struct call_ctx {
  uv_timer_t t; /* first: closed with free() */
  keel_breaker_call *call;
  int status;
} call_ctx;

static void call_finish(uv_timer_t *t) {
  call_ctx *c = t->data;
  keel_breaker_call_done(c->call, c->status);
  uv_close((uv_handle_t *)t, (uv_close_cb)free);
}

static void flaky_op(keel_breaker_call *call, void *data) {
  app *a = data;
  call_ctx *c = malloc(sizeof *c);
  if (c == NULL) {
    keel_breaker_call_done(call, UV_ENOMEM);
    return;
  }
  bool outage = uv_now(a->loop) < a->outage_until;
  c->call = call;
  c->status = outage || rnd(100) < 5 ? UV_ECONNREFUSED : 0;
  uv_timer_init(a->loop, &c->t);
  c->t.data = c;
  uv_timer_start(&c->t, call_finish, 5 + rnd(40), 0);
}

static void call_done(keel_breaker *b, int status, void *data) {
  (void)b, (void)status, (void)data;
}

/* ---- queue with retries ------------------------------------------------ */

typedef struct job_ctx {
  uv_timer_t t; /* first: closed with free() */
  keel_job *job;
} job_ctx;

static void job_finish(uv_timer_t *t) {
  job_ctx *j = t->data;
  keel_job_done(j->job, rnd(100) < 15 ? UV_EIO : 0);
  uv_close((uv_handle_t *)t, (uv_close_cb)free);
}

static void send_email(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)payload;
  app *a = data;
  (void)q;
  job_ctx *j = malloc(sizeof *j);
  if (j == NULL) {
    keel_job_done(job, UV_ENOMEM);
    return;
  }
  j->job = job;
  uv_timer_init(a->loop, &j->t);
  j->t.data = j;
  uv_timer_start(&j->t, job_finish, 10 + rnd(60), 0);
}

/* ---- retry runners that come and go ----------------------------------- */

static void start_sync(app *a);

static void sync_attempt(keel_retry *r, unsigned n, void *data) {
  (void)data;
  keel_retry_report(r, n < 3 && rnd(2) ? UV_ETIMEDOUT : 0);
}

static void sync_done(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)status, (void)attempts;
  app *a = data;
  keel_retry_close(r, NULL, NULL); /* drops it from the dashboard */
  if (a->sync == r) a->sync = NULL;
}

static void start_sync(app *a) {
  keel_retry_opts o;
  keel_retry_opts_init(&o);
  o.max_attempts = 4;
  if (keel_retry_start(a->loop, &o, sync_attempt, sync_done, a, &a->sync) != 0) return;
  char name[32];
  snprintf(name, sizeof name, "sync-%u", ++a->syncs);
  keel_retry_serve(a->server, a->sync, name);
}

/* ---- slugs, listener, verifier ------------------------------------------ */

static void slug_done(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)ig, (void)slug, (void)data;
  if (status != 0 && status != UV_ECANCELED && status != KEEL_ECLOSING)
    fprintf(stderr, "slug insert: %s\n", keel_strerror(status));
}

static void on_order(keel_listener *l, const keel_change *c, void *data) {
  (void)l, (void)c;
  app *a = data;
  a->changes_seen++;
}

static bool validate_order(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)data;
  const char *amount = keel_verify_row_get(row, "amount");
  if (amount != NULL && amount[0] == '-') keel_verify_row_problem(row, "negative_amount");
  if (keel_verify_row_is_null(row, "customer")) keel_verify_row_problem(row, "missing_customer");
  return true;
}

static void fixed(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c, (void)res;
  keel_verify_fix_done(data, status);
}

static void fix_order(keel_verify *v, keel_verify_fix *fix, const keel_verify_row *row,
                      void *data) {
  (void)v;
  app *a = data;
  const char *params[] = {keel_verify_row_get(row, "id")};
  int rc = keel_pg_pool_query(a->pool, a->fix_sql, 1, params, fixed, fix);
  if (rc < 0) keel_verify_fix_done(fix, rc);
}

/* ---- pipeline, durable queue, saga ------------------------------------- */

static void api_op(keel_attempt *at, void *data) {
  (void)data;
  keel_attempt_done(at, rnd(100) < 10 ? UV_ECONNRESET : 0); /* retried by the pipeline */
}

static void api_done(keel_pipeline *p, const keel_pipeline_result *r, void *data) {
  (void)p, (void)r, (void)data;
}

static void run_report(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  (void)q, (void)data;
  if (rnd(100) < 10)
    keel_pgqueue_job_fail(job, UV_EIO, "report service: I/O error"); /* retried */
  else
    keel_pgqueue_job_done(job, 0);
}

static void reserve(keel_saga *s, keel_saga_call *call, void *data) {
  (void)s, (void)data;
  keel_saga_call_done(call, 0);
}

static void charge(keel_saga *s, keel_saga_call *call, void *data) {
  (void)s, (void)data;
  keel_saga_call_done(call, rnd(5) == 0 ? KEEL_EABORTED : 0); /* refused: compensate */
}

/* ---- Redis: a lock, a shared rate limit, idempotency ------------------- */

static void lock_released(keel_redis_lock *lock, int status, void *data) {
  (void)lock, (void)status;
  app *a = data;
  a->lock = NULL;
}

static void lock_taken(keel_redis_lock *lock, int status, void *data) {
  app *a = data;
  if (status != 0) { /* the object is gone after a failed acquire */
    a->lock = NULL;
    return;
  }
  /* the nightly report would run here */
  if (keel_redis_lock_release(lock, lock_released, a) != 0) a->lock = NULL;
}

static void tenant_taken(keel_ratelimit_redis *rl, int status, uint64_t retry_after_ms,
                         uint64_t remaining, void *data) {
  (void)rl, (void)status, (void)retry_after_ms, (void)remaining, (void)data;
}

typedef struct idem_req {
  app *a;
  char key[32];
} idem_req;

static void idem_completed(keel_idem *idem, int status, void *data) {
  (void)idem, (void)status;
  free(data);
}

static void idem_begun(keel_idem *idem, int status, const keel_idem_reply *reply, void *data) {
  idem_req *q = data;
  if (status == 0 && !reply->completed && !q->a->closing &&
      keel_idem_complete(idem, "payments", q->key, &reply->token, 200, "ok", 2, idem_completed,
                         q) == 0)
    return;
  free(q);
}

static void idem_payment(app *a) {
  idem_req *q = malloc(sizeof *q);
  if (q == NULL) return;
  q->a = a;
  /* one request in four is a client's retry of the previous key */
  uint64_t n = rnd(4) == 0 && a->idem_seq > 0 ? a->idem_seq : ++a->idem_seq;
  snprintf(q->key, sizeof q->key, "pay-%d-%llu", (int)getpid(), (unsigned long long)n);
  if (keel_idem_begin(a->payments_idem, "payments", q->key, "amount=10", idem_begun, q) != 0)
    free(q);
}

/* ---- the service's heartbeat -------------------------------------------- */

static void on_tick(uv_timer_t *t) {
  app *a = t->data;
  a->ticks++;
  /* an outage of the payment provider every 20 s, for 6 s */
  if (a->ticks % 400 == 100) a->outage_until = uv_now(a->loop) + 6000;
  if (!a->quiet) keel_breaker_execute(a->payments, flaky_op, 1000, call_done, a);
  if (a->ticks % 2 == 0) keel_queue_push(a->emails, NULL, (int)rnd(3), NULL);
  if (a->ticks % 4 == 0) {
    const char *customer = rnd(10) == 0 ? "NULL" : "'acme'";
    char stmt[256];
    snprintf(stmt, sizeof stmt, "INSERT INTO %s (customer, amount) VALUES (%s, %d)", a->orders,
             customer, (int)rnd(200) - 20);
    keel_pg_query(a->admin, stmt, 0, NULL, ignore, NULL);
  }
  if (a->ticks % 10 == 0) {
    static const char *const names[] = {"Jane Doe", "John Smith", "Ada Lovelace", "Alan Turing"};
    const char *cols[] = {"name"};
    const char *vals[] = {names[rnd(4)]};
    keel_slug_spec spec = {.table = a->cards_table,
                           .slug_column = "slug",
                           .name = vals[0],
                           .columns = cols,
                           .values = vals,
                           .count = 1};
    keel_slug_insert(a->cards, &spec, slug_done, a);
  }
  if (a->sync == NULL && a->ticks % 40 == 0) start_sync(a);
  if (a->ticks % 2 == 0) keel_pipeline_execute(a->api, api_op, api_done, a);
  if (a->ticks % 20 == 0) {
    keel_pgqueue_job_opts j;
    keel_pgqueue_job_opts_init(&j);
    j.kind = "report";
    j.max_attempts = 3;
    keel_pgqueue_enqueue(a->reports, NULL, &j, 1, NULL, NULL);
  }
  if (a->ticks % 200 == 0) keel_saga_start(a->checkout, NULL, NULL, NULL);
  if (a->cache != NULL) {
    if (a->ticks % 10 == 0) {
      char tenant[32];
      snprintf(tenant, sizeof tenant, "tenant-%u", rnd(5));
      keel_ratelimit_redis_take(a->tenants, tenant, 1, tenant_taken, NULL);
    }
    if (a->ticks % 20 == 0) idem_payment(a);
    if (a->ticks % 400 == 0 && a->lock == NULL &&
        keel_redis_lock_acquire(a->cache, "nightly-report", NULL, lock_taken, a, &a->lock) != 0)
      a->lock = NULL;
  }
}

/* ---- start and stop ------------------------------------------------------ */

static void close_admin(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)status, (void)res, (void)data;
  keel_pg_close(c, NULL, NULL);
}

static void close_limiter(void *obj, void *data) {
  (void)obj;
  app *a = data;
  keel_ratelimit_close(a->api_rl, NULL, NULL);
}

static void redis_user_closed(void *obj, void *data) {
  (void)obj;
  app *a = data;
  if (--a->redis_users == 0) keel_redis_close(a->cache, NULL, NULL);
}

static void shut_down(app *a) {
  if (a->closing) return;
  a->closing = true;
  char *text = NULL;
  if (keel_serve_metrics_text(a->server, &text, NULL) == 0) {
    static const char *const kinds[] = {"keel_breaker_state{",
                                        "keel_queue_pending{",
                                        "keel_pg_connected{",
                                        "keel_pg_pool_size{",
                                        "keel_listener_received_total{",
                                        "keel_verifier_runs_started_total{",
                                        "keel_integrity_operations_total{",
                                        "keel_pipeline_calls_total{",
                                        "keel_ratelimit_allowed_total{",
                                        "keel_pgqueue_enqueued_total{",
                                        "keel_saga_started_total{",
                                        "keel_redis_state{",
                                        "keel_ratelimit_redis_allowed_total{",
                                        "keel_idempotency_begins_total{"};
    a->metrics_ok = true;
    size_t nkinds = sizeof kinds / sizeof kinds[0] - (a->cache != NULL ? 0 : 3);
    for (size_t i = 0; i < nkinds; i++)
      if (strstr(text, kinds[i]) == NULL) {
        fprintf(stderr, "missing in /metrics: %s\n", kinds[i]);
        a->metrics_ok = false;
      }
    keel_free(text);
  }
  uv_timer_stop(&a->tick);
  uv_close((uv_handle_t *)&a->tick, NULL);
  uv_close((uv_handle_t *)&a->stop, NULL);
  uv_close((uv_handle_t *)&a->sigint, NULL);
  uv_close((uv_handle_t *)&a->sigusr1, NULL);
  uv_close((uv_handle_t *)&a->sigusr2, NULL);
  keel_serve_close(a->server, NULL, NULL);
  keel_breaker_close(a->payments, NULL, NULL);
  keel_queue_close(a->emails, NULL, NULL);
  keel_retry_close(a->sync, NULL, NULL);
  keel_listener_close(a->listener, NULL, NULL);
  keel_verify_close(a->verifier, NULL, NULL);
  keel_integrity_close(a->cards, NULL, NULL);
  keel_pg_pool_close(a->pool, NULL, NULL);
  keel_pipeline_close(a->api, close_limiter, a); /* the limiter outlives the pipeline */
  keel_pgqueue_close(a->reports, NULL, NULL);
  keel_saga_close(a->checkout, NULL, NULL);
  if (a->cache != NULL) { /* the client outlives the limiter and the store */
    a->redis_users = 2;
    keel_ratelimit_redis_close(a->tenants, redis_user_closed, a);
    keel_idem_close(a->payments_idem, redis_user_closed, a);
  }
  if (!a->forever)
    keel_pg_query(a->admin, sql(a, "DROP SCHEMA IF EXISTS %s CASCADE", a->schema), 0, NULL, ignore,
                  NULL);
  if (a->forever) {
    keel_pg_close(a->admin, NULL, NULL);
  } else {
    keel_pg_query(a->admin, sql(a, "DROP TABLE IF EXISTS %s", a->orders), 0, NULL, ignore, NULL);
    if (keel_pg_query(a->admin, sql(a, "DROP TABLE IF EXISTS %s", a->cards_table), 0, NULL,
                      close_admin, NULL) != 0)
      keel_pg_close(a->admin, NULL, NULL);
  }
}

static void on_stop(uv_timer_t *t) {
  shut_down(t->data);
}
static void on_sigint(uv_signal_t *s, int signum) {
  (void)signum;
  shut_down(s->data);
}
static void on_sigusr1(uv_signal_t *s, int signum) {
  (void)signum;
  app *a = s->data;
  keel_breaker_force_open(a->payments);
  printf("payments breaker forced open\n");
  fflush(stdout);
}
static void on_sigusr2(uv_signal_t *s, int signum) {
  (void)signum;
  app *a = s->data;
  a->quiet = true;
  printf("payments calls stopped\n");
  fflush(stdout);
}

static void on_ready(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "setup failed: %s\n", keel_pg_last_error(c));
    a->failures++;
    shut_down(a);
    return;
  }
  keel_listener_start(a->listener);
  keel_verify_start(a->verifier);
  uv_timer_start(&a->tick, on_tick, 5, 5);
}

static void on_installed(keel_pg *c, int status, void *data) {
  app *a = data;
  if (status != 0) {
    on_ready(c, status, NULL, a);
    return;
  }
  keel_pg_query(a->admin, "SELECT 1", 0, NULL, on_ready, a);
}

static void on_tables(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  app *a = data;
  if (status != 0) {
    on_ready(c, status, NULL, a);
    return;
  }
  keel_listener_install(a->admin, a->orders, "id", NULL, on_installed, a);
}

int main(int argc, char **argv) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL connection string\n");
    return 1;
  }
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  double seconds = 3;
  keel_serve_opts so;
  keel_serve_opts_init(&so);
  so.port = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--forever") == 0)
      a.forever = true;
    else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
      seconds = strtod(argv[++i], NULL);
    else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
      so.port = (int)strtol(argv[++i], NULL, 10);
    else if (strcmp(argv[i], "--token") == 0 && i + 1 < argc)
      so.token = argv[++i];
  }
  srand((unsigned)getpid());
  if (a.forever) {
    snprintf(a.orders, sizeof a.orders, "keel_demo_orders");
    snprintf(a.cards_table, sizeof a.cards_table, "keel_demo_dash_cards");
    snprintf(a.schema, sizeof a.schema, "keel_demo");
  } else {
    snprintf(a.orders, sizeof a.orders, "keel_demo_orders_%d", (int)getpid());
    snprintf(a.cards_table, sizeof a.cards_table, "keel_demo_dash_cards_%d", (int)getpid());
    snprintf(a.schema, sizeof a.schema, "keel_demo_%d", (int)getpid());
  }
  snprintf(a.fix_sql, sizeof a.fix_sql, "UPDATE %s SET amount = 0 WHERE id = $1", a.orders);

  int rc = keel_serve_new(a.loop, &so, &a.server);
  if (rc != 0) {
    fprintf(stderr, "keel_serve_new: %s\n", keel_strerror(rc));
    return 1;
  }
  printf("dashboard: http://127.0.0.1:%d/%s%s\n", keel_serve_port(a.server),
         so.token ? "?token=" : "", so.token ? so.token : "");
  fflush(stdout);

  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 4;
  keel_pg_opts co;
  keel_pg_opts_init(&co);
  co.conninfo = conninfo;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  bo.reset_timeout_ms = 2000;
  keel_queue_opts qo;
  keel_queue_opts_init(&qo);
  qo.concurrency = 4;
  qo.max_retries = 2;
  qo.retry_backoff.base_ms = 100;
  qo.data = &a;
  if (keel_pg_pool_new(a.loop, &po, &a.pool) != 0 || keel_pg_new(a.loop, &co, &a.admin) != 0 ||
      keel_integrity_new(a.loop, a.pool, NULL, &a.cards) != 0 ||
      keel_breaker_new(a.loop, &bo, &a.payments) != 0 ||
      keel_queue_new(a.loop, send_email, &qo, &a.emails) != 0) {
    fprintf(stderr, "start-up failed\n");
    return 1;
  }
  keel_listener_opts lo;
  keel_listener_opts_init(&lo);
  lo.conninfo = conninfo;
  lo.table = a.orders;
  lo.data = &a;
  char why[256];
  if (keel_listener_new_ex(a.loop, &lo, &a.listener, why, sizeof why) != 0) {
    fprintf(stderr, "listener: %s\n", why);
    return 1;
  }
  keel_listener_on(a.listener, "orders-feed", on_order, &a);
  keel_verify_opts vo;
  keel_verify_opts_init(&vo);
  vo.pool = a.pool;
  vo.table = a.orders;
  vo.interval_ms = 5000;
  vo.batch_size = 100;
  vo.validate = validate_order;
  vo.fix = fix_order;
  vo.data = &a;
  if (keel_verify_new_ex(a.loop, &vo, &a.verifier, why, sizeof why) != 0) {
    fprintf(stderr, "verifier: %s\n", why);
    return 1;
  }

  /* the policies, the durable queue and the saga */
  keel_ratelimit_opts rlo;
  keel_ratelimit_opts_init(&rlo);
  rlo.rate = 150; /* a call every 10 ms is asked for: some are refused */
  keel_policy pols[3];
  keel_retry_opts rto;
  keel_retry_opts_init(&rto);
  rto.max_attempts = 3;
  rto.backoff.base_ms = 5;
  keel_pipeline_opts plo;
  keel_pipeline_opts_init(&plo);
  plo.policies = pols;
  plo.npolicies = 3;
  if (keel_ratelimit_new(a.loop, &rlo, &a.api_rl) != 0) return 1;
  keel_policy_ratelimit(&pols[0], a.api_rl);
  keel_policy_retry(&pols[1], &rto);
  keel_policy_timeout(&pols[2], 200);
  if (keel_pipeline_new(a.loop, &plo, &a.api) != 0) {
    fprintf(stderr, "pipeline failed\n");
    return 1;
  }
  keel_pgqueue_opts pqo;
  keel_pgqueue_opts_init(&pqo);
  pqo.conninfo = conninfo;
  pqo.schema = a.schema;
  pqo.queue = "reports";
  pqo.process = run_report;
  pqo.concurrency = 4;
  pqo.retry_backoff.base_ms = 200;
  pqo.stats_ms = 1000;
  if (keel_pgqueue_new_ex(a.loop, &pqo, &a.reports, why, sizeof why) != 0) {
    fprintf(stderr, "durable queue: %s\n", why);
    return 1;
  }
  keel_saga_step steps[2];
  keel_saga_step_init(&steps[0], "reserve", reserve, reserve);
  keel_saga_step_init(&steps[1], "charge", charge, NULL);
  steps[1].kind = KEEL_SAGA_PIVOT;
  keel_saga_opts sgo;
  keel_saga_opts_init(&sgo);
  sgo.conninfo = conninfo;
  sgo.schema = a.schema;
  sgo.type = "checkout";
  sgo.steps = steps;
  sgo.nsteps = 2;
  sgo.pool_size = 2;
  sgo.stats_ms = 1000;
  if (keel_saga_new_ex(a.loop, &sgo, &a.checkout, why, sizeof why) != 0) {
    fprintf(stderr, "saga: %s\n", why);
    return 1;
  }
  const char *redis = getenv("KEEL_REDIS");
  if (redis == NULL || redis[0] == '\0') redis = getenv("KEEL_TEST_REDIS");
  if (redis != NULL && redis[0] != '\0') {
    char url[256];
    snprintf(url, sizeof url, "%s%s", strstr(redis, "://") ? "" : "redis://", redis);
    keel_redis_opts ro;
    keel_redis_opts_init(&ro);
    ro.url = url;
    keel_ratelimit_redis_opts rro;
    keel_ratelimit_redis_opts_init(&rro);
    rro.rate = 5;
    keel_idem_opts io;
    keel_idem_opts_init(&io);
    if (keel_redis_new(a.loop, &ro, &a.cache) != 0 ||
        keel_ratelimit_redis_new(a.cache, &rro, &a.tenants) != 0 ||
        keel_idem_new_redis(a.loop, a.cache, &io, &a.payments_idem) != 0) {
      fprintf(stderr, "redis start-up failed\n");
      return 1;
    }
  }

  keel_pg_pool_serve(a.server, a.pool, "main");
  keel_pg_serve(a.server, a.admin, "admin");
  keel_integrity_serve(a.server, a.cards, "cards");
  keel_breaker_serve(a.server, a.payments, "payments");
  keel_queue_serve(a.server, a.emails, "emails");
  keel_listener_serve(a.server, a.listener, "orders");
  keel_verify_serve(a.server, a.verifier, "orders-check");
  keel_ratelimit_serve(a.server, a.api_rl, "api");
  keel_pipeline_serve(a.server, a.api, "api");
  keel_pgqueue_serve(a.server, a.reports, "reports");
  keel_saga_serve(a.server, a.checkout, "checkout");
  if (a.cache != NULL) {
    keel_redis_serve(a.server, a.cache, "cache");
    keel_ratelimit_redis_serve(a.server, a.tenants, "tenants");
    keel_idem_serve(a.server, a.payments_idem, "payments");
  }

  keel_pg_query(a.admin, sql(&a, "DROP TABLE IF EXISTS %s", a.orders), 0, NULL, ignore, NULL);
  keel_pg_query(a.admin,
                sql(&a,
                    "CREATE TABLE %s (id serial PRIMARY KEY, customer text, amount int, "
                    "created timestamptz DEFAULT now())",
                    a.orders),
                0, NULL, ignore, NULL);
  keel_pg_query(a.admin, sql(&a, "DROP TABLE IF EXISTS %s", a.cards_table), 0, NULL, ignore, NULL);
  keel_pg_query(
      a.admin,
      sql(&a, "CREATE TABLE %s (id serial PRIMARY KEY, slug text UNIQUE NOT NULL, name text)",
          a.cards_table),
      0, NULL, on_tables, &a);

  uv_timer_init(a.loop, &a.tick);
  a.tick.data = &a;
  uv_timer_init(a.loop, &a.stop);
  a.stop.data = &a;
  if (!a.forever) uv_timer_start(&a.stop, on_stop, (uint64_t)(seconds * 1000), 0);
  uv_signal_init(a.loop, &a.sigint);
  a.sigint.data = &a;
  uv_signal_start(&a.sigint, on_sigint, SIGINT);
  uv_signal_init(a.loop, &a.sigusr1);
  a.sigusr1.data = &a;
  uv_signal_start(&a.sigusr1, on_sigusr1, SIGUSR1);
  uv_signal_init(a.loop, &a.sigusr2);
  a.sigusr2.data = &a;
  uv_signal_start(&a.sigusr2, on_sigusr2, SIGUSR2);
  uv_signal_t sigterm;
  uv_signal_init(a.loop, &sigterm);
  sigterm.data = &a;
  uv_signal_start(&sigterm, on_sigint, SIGTERM);
  uv_unref((uv_handle_t *)&sigterm);

  uv_run(a.loop, UV_RUN_DEFAULT);
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_run(a.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(a.loop) != 0) {
    fprintf(stderr, "loop not empty at exit\n");
    return 1;
  }
  bool ok = a.failures == 0 && a.metrics_ok && (a.forever || a.changes_seen > 0);
  printf("%s (%llu changes seen)\n", ok ? "dashboard demo ok" : "dashboard demo FAILED",
         (unsigned long long)a.changes_seen);
  return ok ? 0 : 1;
}
