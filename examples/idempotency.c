/*
 * examples/idempotency.c — idempotency keys (seed 002's flow): the same
 * booking request sent five times at once is processed once; the copies
 * get 409 while it runs, the stored 201 response afterwards, and the key
 * reused with another request body gets 422. First with the Redis store,
 * then with the PostgreSQL store inside the booking's own transaction (the
 * booking row and the stored response commit together).
 *
 * Run: KEEL_PG="host=... dbname=..." KEEL_REDIS=127.0.0.1:6379 ./idempotency
 * (falling back to KEEL_TEST_PG and KEEL_TEST_REDIS). Exits 0 when exactly
 * one booking was made per store and every copy got the right answer.
 */
#include <keel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct app {
  uv_loop_t *loop;
  keel_idem *idem;
  keel_pg_pool *pool;
  char key[40];
  int answers[600]; /* HTTP status per answer, counted */
  int outstanding;
  int bookings;
} app;

typedef struct request {
  app *a;
  const char *body; /* the request body: its fingerprint */
  keel_idem_token token;
  uv_timer_t work;
  keel_pg_tx *tx;
  keel_pg *conn;
  int status; /* PostgreSQL: the answer decided by begin_tx, given when the
                 transaction has ended */
  char text[128];
} request;

static void answer(request *r, int status, const char *body) {
  printf("  request %-22s -> %d %s\n", r->body, status, body);
  r->a->answers[status]++;
  r->a->outstanding--;
  free(r);
}

/* ---- Redis: begin, work (a timer), complete -------------------------------- */

static void on_stored(keel_idem *idem, int status, void *data) {
  request *r = data;
  if (status != 0) fprintf(stderr, "complete: %s\n", keel_idem_last_error(idem));
  answer(r, 201, "{\"booking\":\"slot-9\"}");
}

static void work_done(uv_timer_t *t) {
  request *r = t->data;
  r->a->bookings++; /* the effect, made once */
  const char body[] = "{\"booking\":\"slot-9\"}";
  keel_idem_complete(r->a->idem, "POST /bookings", r->a->key, &r->token, 201, body, sizeof body - 1,
                     on_stored, r);
  uv_close((uv_handle_t *)t, NULL);
}

/* The answer to a duplicate, or 0 when the key is ours. */
static int duplicate(keel_idem *idem, int status, const keel_idem_reply *rep, request *r) {
  if (status == KEEL_EINPROGRESS) {
    snprintf(r->text, sizeof r->text, "in progress");
    return 409;
  }
  if (status == KEEL_EMISMATCH) {
    snprintf(r->text, sizeof r->text, "key reused with another request");
    return 422;
  }
  if (status < 0) {
    snprintf(r->text, sizeof r->text, "%s", keel_idem_last_error(idem));
    return 503;
  }
  if (rep->completed) {
    snprintf(r->text, sizeof r->text, "%.*s (stored)", (int)rep->body_len, rep->body);
    return rep->response_status;
  }
  return 0;
}

static void on_begin(keel_idem *idem, int status, const keel_idem_reply *rep, void *data) {
  request *r = data;
  int code = duplicate(idem, status, rep, r);
  if (code != 0) {
    answer(r, code, r->text);
    return;
  }
  r->token = rep->token; /* ours: do the work */
  uv_timer_init(r->a->loop, &r->work);
  r->work.data = r;
  uv_timer_start(&r->work, work_done, 100, 0);
}

static request *new_request(app *a, const char *body) {
  request *r = calloc(1, sizeof *r);
  r->a = a;
  r->body = body;
  a->outstanding++;
  return r;
}

static void send_request(app *a, const char *body) {
  request *r = new_request(a, body);
  keel_idem_begin(a->idem, "POST /bookings", a->key, body, on_begin, r);
}

static void run_until_answered(app *a) {
  while (a->outstanding > 0) uv_run(a->loop, UV_RUN_ONCE);
}

static bool check(app *a, const char *store) {
  bool ok =
      /* of the five sent at once one runs, the others see 409 (or, once it
         committed, the stored 201); the three later copies get the stored
         201 and the other request 422 */
      a->bookings == 1 && a->answers[201] >= 4 && a->answers[201] + a->answers[409] == 8 &&
      a->answers[422] == 1;
  printf("%s: %d booking(s), %d x 201, %d x 409, %d x 422: %s\n", store, a->bookings,
         a->answers[201], a->answers[409], a->answers[422], ok ? "ok" : "WRONG");
  return ok;
}

static void scenario(app *a) {
  for (int i = 0; i < 5; i++) send_request(a, "{\"slot\":9,\"user\":1}");
  run_until_answered(a); /* 1 x 201, 4 x 409 */
  for (int i = 0; i < 3; i++) send_request(a, "{\"slot\":9,\"user\":1}");
  send_request(a, "{\"slot\":7,\"user\":1}");
  run_until_answered(a); /* 3 x stored 201, 1 x 422 */
}

/* ---- PostgreSQL: begin_tx, INSERT, complete_tx, COMMIT ----------------------- */

static void tx_stored(keel_idem *idem, int status, void *data) {
  request *r = data;
  keel_pg_tx_finish(r->tx, status);
}

static void tx_inserted(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  request *r = data;
  if (status != 0) {
    keel_pg_tx_finish(r->tx, status);
    return;
  }
  const char body[] = "{\"booking\":\"slot-9\"}";
  keel_idem_complete_tx(r->a->idem, c, "POST /bookings", r->a->key, &r->token, 201, body,
                        sizeof body - 1, tx_stored, r);
}

static void tx_begun(keel_idem *idem, int status, const keel_idem_reply *rep, void *data) {
  request *r = data;
  r->status = duplicate(idem, status, rep, r);
  if (r->status != 0) {
    keel_pg_tx_finish(r->tx, -1); /* nothing to do in this transaction */
    return;
  }
  r->token = rep->token;
  const char *params[] = {r->a->key};
  keel_pg_query(r->conn, "INSERT INTO keel_example_bookings (request_key, slot) VALUES ($1, 9)", 1,
                params, tx_inserted, r);
}

static void tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  request *r = data;
  r->tx = tx;
  r->conn = conn;
  keel_idem_begin_tx(r->a->idem, conn, "POST /bookings", r->a->key, r->body, tx_begun, r);
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  request *r = data;
  if (r->status != 0) {
    answer(r, r->status, r->text);
  } else if (status == 0) {
    r->a->bookings++;
    answer(r, 201, "{\"booking\":\"slot-9\"} (booking and response committed together)");
  } else {
    fprintf(stderr, "transaction: %s\n", keel_pg_pool_last_error(pool));
    answer(r, 503, "transaction failed");
  }
}

static void send_tx_request(app *a, const char *body) {
  request *r = new_request(a, body);
  keel_pg_pool_transaction(a->pool, KEEL_PG_READ_COMMITTED, tx_body, tx_done, r);
}

static void on_sql(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  if (status != 0) fprintf(stderr, "setup: %s\n", keel_pg_last_error(c));
  (*(int *)data)--;
}

static void on_installed(keel_idem *idem, int status, void *data) {
  if (status != 0) fprintf(stderr, "install: %s\n", keel_idem_last_error(idem));
  (*(int *)data)--;
}

int main(void) {
  uv_loop_t *loop = uv_default_loop();
  const char *pg = getenv("KEEL_PG") ? getenv("KEEL_PG") : getenv("KEEL_TEST_PG");
  const char *redis = getenv("KEEL_REDIS") ? getenv("KEEL_REDIS") : getenv("KEEL_TEST_REDIS");
  if (pg == NULL || redis == NULL) {
    fprintf(stderr, "set KEEL_PG and KEEL_REDIS\n");
    return 2;
  }
  app a = {.loop = loop};
  unsigned char rnd[8];
  uv_random(NULL, NULL, rnd, sizeof rnd, 0, NULL);
  snprintf(a.key, sizeof a.key, "req-%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
           rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);

  /* Redis */
  char url[160];
  snprintf(url, sizeof url, "redis://%s", redis);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  keel_redis *r;
  if (keel_redis_new(loop, &ro, &r) != 0 || keel_idem_new_redis(loop, r, NULL, &a.idem) != 0)
    return 1;
  printf("Redis store, key %s:\n", a.key);
  scenario(&a);
  bool ok = check(&a, "Redis");
  keel_idem_close(a.idem, NULL, NULL);
  keel_redis_close(r, NULL, NULL);

  /* PostgreSQL, inside the booking's transaction */
  memset(a.answers, 0, sizeof a.answers);
  a.bookings = 0;
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = pg;
  if (keel_pg_pool_new(loop, &po, &a.pool) != 0 || keel_idem_new_pg(loop, a.pool, NULL, &a.idem))
    return 1;
  int setup = 2;
  keel_pg_pool_query(a.pool,
                     "CREATE TABLE IF NOT EXISTS keel_example_bookings "
                     "(request_key text, slot int, booked_at timestamptz DEFAULT now())",
                     0, NULL, on_sql, &setup);
  keel_idem_install(a.idem, on_installed, &setup);
  while (setup > 0) uv_run(loop, UV_RUN_ONCE);
  printf("PostgreSQL store, in the booking's transaction:\n");
  for (int i = 0; i < 5; i++) send_tx_request(&a, "{\"slot\":9,\"user\":1}");
  run_until_answered(&a);
  for (int i = 0; i < 3; i++) send_tx_request(&a, "{\"slot\":9,\"user\":1}");
  send_tx_request(&a, "{\"slot\":7,\"user\":1}");
  run_until_answered(&a);
  /* In a transaction the copies that come while the first one has not
   * committed are 409, the later ones see the stored response. */
  ok = check(&a, "PostgreSQL") && ok;
  keel_idem_close(a.idem, NULL, NULL);
  keel_pg_pool_close(a.pool, NULL, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  return ok && uv_loop_close(loop) == 0 ? 0 : 1;
}
