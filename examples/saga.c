/*
 * examples/saga.c — the seed's orchestrated saga: Book Item → Charge Wallet
 * → Reserve Slot, with Release Item and Refund as compensations, persisted
 * step by step so that a killed orchestrator's sagas finish in the next one.
 *
 * The three services are three PostgreSQL tables (items, wallets, slots),
 * each with its own idempotency rows (table idem): a request carries the
 * saga's stable key, a repeated request gets the stored answer, and a
 * compensation first writes a tombstone under the action's key, so that an
 * action arriving late (after its saga gave up on it) is refused.
 *
 * The parent starts three sagas (start keys, so a re-run starts nothing
 * twice):
 *   order 1  wallet 1 has the money: done;
 *   order 2  wallet 2 cannot pay: Release Item, compensated;
 *   order 3  wallet 3 answers after 1.5 s, the step times out after 300 ms:
 *            Refund (tombstone) and Release Item, compensated; the late
 *            charge then reaches the wallet and is refused by the tombstone.
 * A first orchestrator process is SIGKILLed in the middle of its work; a
 * second one takes the sagas over once their leases expire, from the log.
 *
 * Run: ./saga                 the scenario above, exits 0 when it held
 *      ./saga --forever       the scenario, then an order every 500 ms until
 *                             Ctrl-C (kill and restart ./saga --orchestrate
 *                             SCHEMA meanwhile: nothing is lost)
 *      ./saga --orchestrate SCHEMA   an orchestrator only
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

static char schema[64];
static const char *conninfo;

/* ---- the participants: three services, their SQL ------------------------- */

static void one_done(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  int *pending = data;
  (*pending)--;
  if (status != 0) fprintf(stderr, "%s\n", keel_pg_last_error(c));
}

static int run_sql(uv_loop_t *loop, keel_pg_pool *pool, const char *sql) {
  int pending = 1;
  if (keel_pg_pool_query(pool, sql, 0, NULL, one_done, &pending) != 0) return 1;
  while (pending > 0) uv_run(loop, UV_RUN_ONCE);
  return 0;
}

static int install(uv_loop_t *loop, keel_pg_pool *pool) {
  const char *s = schema;
  char sql[2048];
  const char *tables[] = {
      "CREATE TABLE %s.items (id int PRIMARY KEY, booked int NOT NULL DEFAULT 0)",
      "CREATE TABLE %s.wallets (id int PRIMARY KEY, balance int NOT NULL)",
      "CREATE TABLE %s.slots (id int PRIMARY KEY, reserved int NOT NULL DEFAULT 0)",
      /* each service's idempotency rows: key → answer; 'tombstone' = refused */
      "CREATE TABLE %s.idem (key text PRIMARY KEY, result text, applied bool NOT NULL"
      " DEFAULT false)",
      "INSERT INTO %s.items SELECT g FROM generate_series(1, 1000) g",
      "INSERT INTO %s.wallets SELECT g, CASE WHEN g = 2 THEN 10 ELSE 100 END"
      " FROM generate_series(1, 1000) g",
      "INSERT INTO %s.slots SELECT g FROM generate_series(1, 1000) g",
  };
  snprintf(sql, sizeof sql, "CREATE SCHEMA %s", s);
  if (run_sql(loop, pool, sql)) return 1;
  for (size_t i = 0; i < sizeof tables / sizeof *tables; i++) {
    snprintf(sql, sizeof sql, tables[i], s);
    if (run_sql(loop, pool, sql)) return 1;
  }
  /* an action: once per key; a repeated key gets the first answer */
  snprintf(sql, sizeof sql,
           "CREATE FUNCTION %s.act(k text, kind text, tgt int, amt int) RETURNS text"
           " LANGUAGE plpgsql AS $f$ DECLARE r text; BEGIN"
           " INSERT INTO %s.idem (key) VALUES (k) ON CONFLICT DO NOTHING;"
           " IF NOT FOUND THEN SELECT i.result INTO r FROM %s.idem i WHERE i.key = k;"
           "  RETURN r; END IF;"
           " IF kind = 'book' THEN UPDATE %s.items SET booked = booked + 1 WHERE id = tgt;"
           "  r := 'ok';"
           " ELSIF kind = 'charge' THEN UPDATE %s.wallets SET balance = balance - amt"
           "  WHERE id = tgt AND balance >= amt;"
           "  IF FOUND THEN r := 'ok'; ELSE r := 'insufficient funds'; END IF;"
           " ELSE UPDATE %s.slots SET reserved = reserved + 1 WHERE id = tgt; r := 'ok'; END IF;"
           " UPDATE %s.idem SET result = r, applied = (r = 'ok') WHERE key = k;"
           " RETURN r; END $f$",
           s, s, s, s, s, s, s);
  if (run_sql(loop, pool, sql)) return 1;
  /* a compensation: tombstone the action's key first; undo only what was
   * applied; "nothing to undo" is a success */
  snprintf(sql, sizeof sql,
           "CREATE FUNCTION %s.undo(ck text, ak text, kind text, tgt int, amt int)"
           " RETURNS text LANGUAGE plpgsql AS $f$ DECLARE r text; a bool; BEGIN"
           " INSERT INTO %s.idem (key, result) VALUES (ak, 'tombstone')"
           "  ON CONFLICT DO NOTHING;"
           " IF FOUND THEN RETURN 'nothing to undo'; END IF;"
           " INSERT INTO %s.idem (key) VALUES (ck) ON CONFLICT DO NOTHING;"
           " IF NOT FOUND THEN RETURN 'ok'; END IF;"
           " SELECT i.applied INTO a FROM %s.idem i WHERE i.key = ak;"
           " IF a THEN"
           "  IF kind = 'book' THEN UPDATE %s.items SET booked = booked - 1 WHERE id = tgt;"
           "  ELSE UPDATE %s.wallets SET balance = balance + amt WHERE id = tgt; END IF;"
           " END IF;"
           " UPDATE %s.idem SET result = 'ok' WHERE key = ck;"
           " RETURN 'ok'; END $f$",
           s, s, s, s, s, s, s);
  return run_sql(loop, pool, sql);
}

/* ---- the orchestrator ---------------------------------------------------- */

typedef struct orch {
  uv_loop_t *loop;
  keel_pg_pool *services; /* how the orchestrator reaches the services */
  keel_saga *saga;
  bool ready;
} orch;

typedef struct request {
  keel_saga_call *call;
  char sql[256];
} request;

static int field(const char *json, const char *name) {
  char pat[32];
  snprintf(pat, sizeof pat, "\"%s\": ", name); /* jsonb's spacing */
  const char *p = strstr(json, pat);
  return p ? atoi(p + strlen(pat)) : 0;
}

static void on_reply(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  request *rq = data;
  (void)c;
  const char *answer = status == 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  int st = status;
  if (answer && strcmp(answer, "ok") != 0 && strcmp(answer, "nothing to undo") != 0)
    st = KEEL_EABORTED; /* a certain refusal: insufficient funds, tombstone */
  printf("  %s %s: %s\n", keel_saga_call_key(rq->call),
         keel_saga_call_is_compensation(rq->call) ? "(compensation)" : "",
         answer ? answer : keel_strerror(status));
  fflush(stdout);
  keel_saga_call_done(rq->call, st); /* KEEL_ESTALE when the step timed out first */
  free(rq);
}

static orch *g_orch;

static void request_service(keel_saga_call *call, const char *kind, const char *field_name) {
  const char *data = keel_saga_call_data(call);
  int tgt = field(data, field_name), amount = field(data, "amount");
  bool slow = strcmp(kind, "charge") == 0 && field(data, "slow") == 1 &&
              !keel_saga_call_is_compensation(call);
  request *rq = calloc(1, sizeof *rq);
  rq->call = call;
  char t[16], a[16], akey[128];
  snprintf(t, sizeof t, "%d", tgt);
  snprintf(a, sizeof a, "%d", amount);
  int rc;
  if (keel_saga_call_is_compensation(call)) {
    snprintf(akey, sizeof akey, "saga:%lld:%u:action", (long long)keel_saga_call_saga_id(call),
             keel_saga_call_step(call));
    const char *p[5] = {keel_saga_call_key(call), akey, kind, t, a};
    snprintf(rq->sql, sizeof rq->sql, "SELECT %s.undo($1, $2, $3, $4::int, $5::int)", schema);
    rc = keel_pg_pool_query(g_orch->services, rq->sql, 5, p, on_reply, rq);
  } else {
    const char *p[4] = {keel_saga_call_key(call), kind, t, a};
    /* wallet 3 is slow: its answer comes after the step's timeout */
    if (slow)
      snprintf(rq->sql, sizeof rq->sql,
               "SELECT r FROM pg_sleep(1.5), %s.act($1, $2, $3::int, $4::int) r", schema);
    else
      snprintf(rq->sql, sizeof rq->sql, "SELECT %s.act($1, $2, $3::int, $4::int)", schema);
    rc = keel_pg_pool_query(g_orch->services, rq->sql, 4, p, on_reply, rq);
  }
  if (rc != 0) {
    keel_saga_call_done(call, rc);
    free(rq);
  }
}

static void book(keel_saga *s, keel_saga_call *c, void *d) {
  (void)s, (void)d;
  request_service(c, "book", "item");
}
static void charge(keel_saga *s, keel_saga_call *c, void *d) {
  (void)s, (void)d;
  request_service(c, "charge", "wallet");
}
static void reserve(keel_saga *s, keel_saga_call *c, void *d) {
  (void)s, (void)d;
  request_service(c, "reserve", "slot");
}

static void on_end(keel_saga *s, int64_t id, keel_saga_state st, void *data) {
  (void)s, (void)data;
  printf("saga %lld: %s\n", (long long)id, keel_saga_state_name(st));
  fflush(stdout);
}

static void on_stuck(keel_saga *s, int64_t id, unsigned step, const char *err, void *data) {
  (void)s, (void)data;
  printf("saga %lld: FAILED at step %u (%s): an operator re-drives it\n", (long long)id, step,
         err ? err : "");
}

static void on_ready(keel_saga *s, int status, void *data) {
  orch *o = data;
  if (status != 0) fprintf(stderr, "saga: %s\n", keel_saga_last_error(s));
  o->ready = status == 0;
}

/* The saga type, the same in every process. */
static int saga_new(orch *o, bool orchestrate) {
  static keel_saga_step steps[3];
  /* Release Item and Refund go to the same services, as compensations */
  keel_saga_step_init(&steps[0], "book_item", book, book);
  keel_saga_step_init(&steps[1], "charge_wallet", charge, charge);
  keel_saga_step_init(&steps[2], "reserve_slot", reserve, NULL);
  steps[1].timeout_ms = 300; /* an answer later than this is "unknown" */
  steps[1].max_attempts = 1; /* ... and compensated at once */
  steps[2].kind = KEEL_SAGA_RETRIABLE;
  keel_saga_opts so;
  keel_saga_opts_init(&so);
  so.conninfo = conninfo;
  so.schema = schema;
  so.type = "order";
  so.steps = steps;
  so.nsteps = 3;
  so.orchestrate = orchestrate;
  so.lease_ms = 1000; /* a killed orchestrator's sagas move on within ~1.5 s */
  so.poll_ms = 200;
  so.on_end = on_end;
  so.on_stuck = on_stuck;
  so.on_ready = on_ready;
  so.data = o;
  char why[200];
  if (keel_saga_new_ex(o->loop, &so, &o->saga, why, sizeof why) != 0) {
    fprintf(stderr, "keel_saga_new: %s\n", why);
    return 1;
  }
  return 0;
}

static int run_orchestrator(void) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  orch o = {.loop = &loop};
  g_orch = &o;
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 4;
  if (keel_pg_pool_new(&loop, &po, &o.services) != 0) return 1;
  if (saga_new(&o, true) != 0) return 1;
  uv_run(&loop, UV_RUN_DEFAULT); /* until killed */
  return 0;
}

/* ---- the parent: starts orders, kills an orchestrator, checks ----------- */

/* Which order a start callback is for: starts may finish in any order. */
typedef struct order_ref {
  struct app *a;
  int n; /* 1..3: the scenario's orders; 0: a later one */
} order_ref;

typedef struct app {
  orch o;
  int started;
  int64_t ids[3];    /* saga ids of orders 1..3 */
  order_ref refs[4]; /* orders 1..3 and the repeated order 1 */
  order_ref later;   /* --forever's orders */
} app;

static void on_started(keel_saga *s, int status, int64_t id, bool existed, void *data) {
  order_ref *ref = data;
  app *a = ref->a;
  if (status != 0) {
    fprintf(stderr, "start: %s\n", keel_saga_last_error(s));
    exit(1);
  }
  if (ref->n > 0)
    printf("order %d: saga %lld%s\n", ref->n, (long long)id, existed ? " (existed)" : "");
  else
    printf("another order: saga %lld\n", (long long)id);
  /* a repeated start reports the existing saga, or id 0 when it raced the first */
  if (ref->n > 0 && !existed) a->ids[ref->n - 1] = id;
  a->started++;
}

static void start_order(app *a, order_ref *ref, int n, int wallet, int slow) {
  char data[160], key[32];
  snprintf(data, sizeof data,
           "{\"item\": %d, \"wallet\": %d, \"slot\": %d, \"amount\": 40, \"slow\": %d}", n, wallet,
           n, slow);
  snprintf(key, sizeof key, "order-%d", n);
  keel_saga_start_opts so;
  keel_saga_start_opts_init(&so);
  so.data = data;
  so.start_key = key; /* starting order n again starts nothing */
  ref->a = a;
  ref->n = ref == &a->later ? 0 : (n - 1) % 3 + 1;
  if (keel_saga_start(a->o.saga, &so, on_started, ref) != 0) exit(1);
}

static char g_val[128];
static void on_val(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  int *pending = data;
  snprintf(g_val, sizeof g_val, "%s",
           status == 0 && keel_pg_result_value(res, 0, 0) ? keel_pg_result_value(res, 0, 0) : "");
  (*pending)--;
}

static const char *query1(uv_loop_t *loop, keel_pg_pool *pool, const char *fmt) {
  char sql[512];
  snprintf(sql, sizeof sql, fmt, schema, schema, schema);
  int pending = 1;
  if (keel_pg_pool_query(pool, sql, 0, NULL, on_val, &pending) != 0) return "";
  while (pending > 0) uv_run(loop, UV_RUN_ONCE);
  return g_val;
}

static pid_t spawn_orchestrator(void) {
  fflush(stdout);
  pid_t p = fork();
  if (p == 0) _exit(run_orchestrator());
  return p;
}

int main(int argc, char **argv) {
  conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || !*conninfo) conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL || !*conninfo) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL conninfo\n");
    return 2;
  }
  if (argc > 2 && strcmp(argv[1], "--orchestrate") == 0) {
    snprintf(schema, sizeof schema, "%s", argv[2]);
    return run_orchestrator();
  }
  bool forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  snprintf(schema, sizeof schema, "keel_example_saga_%d", (int)getpid());
  uv_loop_t *loop = uv_default_loop();
  app a = {.o = {.loop = loop}};
  g_orch = &a.o;
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 2;
  if (keel_pg_pool_new(loop, &po, &a.o.services) != 0) return 1;
  if (install(loop, a.o.services) != 0) return 1;
  /* this process only starts sagas; orchestrators are other processes */
  if (saga_new(&a.o, false) != 0) return 1;
  while (!a.o.ready) uv_run(loop, UV_RUN_ONCE);
  printf("schema %s (./saga --orchestrate %s runs an orchestrator)\n", schema, schema);
  start_order(&a, &a.refs[0], 1, 1, 0);
  start_order(&a, &a.refs[1], 2, 2, 0);
  start_order(&a, &a.refs[2], 3, 3, 1);
  start_order(&a, &a.refs[3], 1, 1, 0); /* a repeated order: reported as existing */
  while (a.started < 4) uv_run(loop, UV_RUN_ONCE);

  pid_t first = spawn_orchestrator();
  usleep(400 * 1000);
  kill(first, SIGKILL); /* in the middle of its work */
  waitpid(first, NULL, 0);
  printf("orchestrator %d killed; starting another\n", (int)first);
  pid_t second = spawn_orchestrator();

  int n = 4;
  for (int i = 0; i < 600; i++) {
    const char *open = query1(loop, a.o.services,
                              "SELECT count(*) FROM %s.saga_instances WHERE state IN"
                              " ('running','compensating')");
    if (strcmp(open, "0") == 0 && !forever) break;
    if (forever) {
      n++;
      start_order(&a, &a.later, n, 1 + n % 7, 0);
    }
    usleep(forever ? 500 * 1000 : 100 * 1000);
    uv_run(loop, UV_RUN_NOWAIT);
  }
  /* the late charge of order 3 reaches the wallet now, after the compensation */
  usleep(1600 * 1000);
  char late[256];
  snprintf(late, sizeof late, "SELECT %%s.act('saga:%lld:1:action', 'charge', 3, 40)",
           (long long)a.ids[2]);
  printf("late charge of order 3 at the wallet: %s\n", query1(loop, a.o.services, late));
  bool ok = true;
  char q[256];
  const char *states[3] = {"done", "compensated", "compensated"};
  for (int i = 0; i < 3; i++) {
    snprintf(q, sizeof q, "SELECT state FROM %%s.saga_instances WHERE id = %lld",
             (long long)a.ids[i]);
    const char *st = query1(loop, a.o.services, q);
    printf("order %d: %s\n", i + 1, st);
    ok = ok && strcmp(st, states[i]) == 0;
  }
  const char *bal = query1(loop, a.o.services,
                           "SELECT string_agg(balance::text, ',' ORDER BY id) FROM %s.wallets"
                           " WHERE id <= 3");
  printf("wallets 1..3: %s (100-40, untouched, untouched)\n", bal);
  ok = ok && strcmp(bal, "60,10,100") == 0;
  const char *booked = query1(loop, a.o.services,
                              "SELECT string_agg(booked::text, ',' ORDER BY id) FROM %s.items"
                              " WHERE id <= 3");
  printf("items 1..3 booked: %s\n", booked);
  ok = ok && strcmp(booked, "1,0,0") == 0;

  kill(second, SIGKILL);
  waitpid(second, NULL, 0);
  char sql[128];
  snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE", schema);
  run_sql(loop, a.o.services, sql);
  keel_saga_close(a.o.saga, NULL, NULL);
  keel_pg_pool_close(a.o.services, NULL, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  printf("%s\n",
         ok ? "ok: every order ended as its wallet decided, nothing applied twice" : "FAILED");
  return ok && uv_loop_close(loop) == 0 ? 0 : 1;
}
