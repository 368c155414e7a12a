/* Shared fixture of the saga suites: the seed's three participants (items,
 * wallets, slots) as PostgreSQL tables with their own idempotency rows and
 * tombstones, in one schema per test, and the saga type Book Item (C) →
 * Charge Wallet (pivot) → Reserve Slot (retriable) that calls them. */
#ifndef KT_SAGA_COMMON_H
#define KT_SAGA_COMMON_H

#include <criterion/criterion.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keel/pg.h"
#include "keel/saga.h"
#include "support/harness.h"

/* What the participants do, set by each test (also in forked children). */
typedef struct ctl {
  int fail_release;   /* compensation of step 0 fails this many times; -1 forever */
  int fail_reserve;   /* reserve fails this many times */
  bool hold_charge;   /* the charge is not sent: kept for a late reply */
  int err_per_mille;  /* soak: random participant errors */
  int max_latency_ms; /* soak: random latency */
  unsigned seed;
  /* observations */
  int releases_called;
  int stuck;
  int64_t stuck_id;
  int ended;
  keel_saga_call *held;
  char held_key[128];
} ctl;

typedef struct world {
  uv_loop_t loop;
  char schema[64];
  keel_pg_pool *pp; /* the participants' connections */
  keel_saga *s;
  keel_saga_opts o;
  keel_saga_step steps[3];
  bool ready;
  int ready_status;
  ctl c;
  /* start results */
  int started;
  int start_status;
  int64_t ids[2048];
  int nids;
  bool closed;
} world;

typedef struct op {
  world *w;
  keel_saga_call *call;
  uv_timer_t t;
  char sql[512];
  char key[128];
  char akey[128];
  char kind[16];
  int tgt, amt;
  bool comp;
} op;

static inline int json_int(const char *json, const char *name) {
  char pat[32];
  snprintf(pat, sizeof pat, "\"%s\":", name);
  const char *p = strstr(json, pat);
  if (p == NULL) {
    snprintf(pat, sizeof pat, "\"%s\": ", name);
    p = strstr(json, pat);
  }
  return p ? (int)strtol(p + strlen(pat), NULL, 10) : 0;
}

static inline void op_closed(uv_handle_t *h) {
  free(h->data);
}

static inline void on_part(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  op *o = data;
  (void)c;
  int st = status;
  if (st == 0) {
    const char *r = keel_pg_result_value(res, 0, 0);
    if (r && (strcmp(r, "refused") == 0 || strcmp(r, "tombstone") == 0)) st = KEEL_EABORTED;
  }
  if (o->call) keel_saga_call_done(o->call, st);
  uv_close((uv_handle_t *)&o->t, op_closed);
}

static inline void op_send(uv_timer_t *t) {
  op *o = t->data;
  world *w = o->w;
  int rc;
  if (o->comp) {
    const char *p[5] = {o->key, o->akey, o->kind, NULL, NULL};
    char tg[16], am[16];
    snprintf(tg, sizeof tg, "%d", o->tgt);
    snprintf(am, sizeof am, "%d", o->amt);
    p[3] = tg, p[4] = am;
    snprintf(o->sql, sizeof o->sql, "SELECT %s.undo($1, $2, $3, $4::int, $5::int)", w->schema);
    rc = keel_pg_pool_query(w->pp, o->sql, 5, p, on_part, o);
  } else {
    char tg[16], am[16];
    snprintf(tg, sizeof tg, "%d", o->tgt);
    snprintf(am, sizeof am, "%d", o->amt);
    const char *p[4] = {o->key, o->kind, tg, am};
    snprintf(o->sql, sizeof o->sql, "SELECT %s.act($1, $2, $3::int, $4::int)", w->schema);
    rc = keel_pg_pool_query(w->pp, o->sql, 4, p, on_part, o);
  }
  if (rc != 0) {
    if (o->call) keel_saga_call_done(o->call, rc);
    uv_close((uv_handle_t *)&o->t, op_closed);
  }
}

static inline bool chance(world *w, int per_mille) {
  return per_mille > 0 && (int)(rand_r(&w->c.seed) % 1000) < per_mille;
}

/* Calls a participant for this attempt (after a random latency). */
static inline void participant(world *w, keel_saga_call *call, const char *kind, bool comp) {
  const char *d = keel_saga_call_data(call);
  if (w->c.err_per_mille && chance(w, w->c.err_per_mille)) {
    keel_saga_call_done(call, KEEL_ECONN); /* a participant that was not reached */
    return;
  }
  op *o = calloc(1, sizeof *o);
  o->w = w;
  o->call = call;
  o->comp = comp;
  snprintf(o->key, sizeof o->key, "%s", keel_saga_call_key(call));
  if (comp) {
    /* the action's key: same saga and step */
    snprintf(o->akey, sizeof o->akey, "saga:%" PRId64 ":%u:action", keel_saga_call_saga_id(call),
             keel_saga_call_step(call));
  }
  snprintf(o->kind, sizeof o->kind, "%s", kind);
  const char *field = strcmp(kind, "book") == 0     ? "item"
                      : strcmp(kind, "charge") == 0 ? "wallet"
                                                    : "slot";
  o->tgt = json_int(d, field);
  o->amt = json_int(d, "amount");
  uv_timer_init(&w->loop, &o->t);
  o->t.data = o;
  int lat = w->c.max_latency_ms > 0 ? (int)(rand_r(&w->c.seed) % (unsigned)w->c.max_latency_ms) : 0;
  if (lat > 0 && chance(w, 500))
    uv_timer_start(&o->t, op_send, (uint64_t)lat, 0);
  else
    op_send(&o->t);
  /* a random error after the participant applied it: the reply is lost */
  if (w->c.err_per_mille && chance(w, w->c.err_per_mille)) {
    o->call = NULL;
    keel_saga_call_done(call, KEEL_EINDOUBT);
  }
}

static inline void s_book(keel_saga *s, keel_saga_call *c, void *data) {
  (void)s;
  participant(data, c, "book", false);
}
static inline void s_release(keel_saga *s, keel_saga_call *c, void *data) {
  (void)s;
  world *w = data;
  w->c.releases_called++;
  if (w->c.fail_release != 0) {
    if (w->c.fail_release > 0) w->c.fail_release--;
    keel_saga_call_done(c, KEEL_ECONN);
    return;
  }
  participant(w, c, "book", true);
}
static inline void s_charge(keel_saga *s, keel_saga_call *c, void *data) {
  (void)s;
  world *w = data;
  if (w->c.hold_charge) {
    w->c.held = c;
    snprintf(w->c.held_key, sizeof w->c.held_key, "%s", keel_saga_call_key(c));
    return;
  }
  participant(w, c, "charge", false);
}
static inline void s_refund(keel_saga *s, keel_saga_call *c, void *data) {
  (void)s;
  participant(data, c, "charge", true);
}
static inline void s_reserve(keel_saga *s, keel_saga_call *c, void *data) {
  (void)s;
  world *w = data;
  if (w->c.fail_reserve > 0) {
    w->c.fail_reserve--;
    keel_saga_call_done(c, KEEL_ECONN);
    return;
  }
  participant(w, c, "reserve", false);
}

static inline void w_ready(keel_saga *s, int status, void *data) {
  (void)s;
  world *w = data;
  w->ready = true;
  w->ready_status = status;
}
static inline void w_stuck(keel_saga *s, int64_t id, unsigned step, const char *err, void *data) {
  (void)s, (void)step, (void)err;
  world *w = data;
  w->c.stuck++;
  w->c.stuck_id = id;
}
static inline void w_end(keel_saga *s, int64_t id, keel_saga_state st, void *data) {
  (void)s, (void)id, (void)st;
  ((world *)data)->c.ended++;
}

/* The participants' schema: three tables, idempotency rows (with
 * tombstones) and an effects log to count applications. */
static inline void participants_install(const char *schema, int n, int balance) {
  kt_pg_execf("CREATE SCHEMA %s", schema);
  kt_pg_execf(
      "CREATE TABLE %s.items (id int PRIMARY KEY, booked int NOT NULL DEFAULT 0);"
      "CREATE TABLE %s.wallets (id int PRIMARY KEY, balance int NOT NULL);"
      "CREATE TABLE %s.slots (id int PRIMARY KEY, reserved int NOT NULL DEFAULT 0);"
      "CREATE TABLE %s.idem (key text PRIMARY KEY, result text,"
      " applied bool NOT NULL DEFAULT false);"
      "CREATE TABLE %s.effects (key text NOT NULL, kind text NOT NULL);"
      "INSERT INTO %s.items SELECT g FROM generate_series(1, %d) g;"
      "INSERT INTO %s.wallets SELECT g, %d FROM generate_series(1, %d) g;"
      "INSERT INTO %s.slots SELECT g FROM generate_series(1, %d) g;",
      schema, schema, schema, schema, schema, schema, n, schema, balance, n, schema, n);
  kt_pg_execf(
      "CREATE FUNCTION %s.act(k text, kind text, tgt int, amt int) RETURNS text"
      " LANGUAGE plpgsql AS $f$ DECLARE r text; BEGIN"
      " INSERT INTO %s.idem (key) VALUES (k) ON CONFLICT DO NOTHING;"
      " IF NOT FOUND THEN SELECT i.result INTO r FROM %s.idem i WHERE i.key = k; RETURN r; END IF;"
      " IF kind = 'book' THEN UPDATE %s.items SET booked = booked + 1 WHERE id = tgt; r := 'ok';"
      " ELSIF kind = 'charge' THEN UPDATE %s.wallets SET balance = balance - amt"
      "  WHERE id = tgt AND balance >= amt;"
      "  IF FOUND THEN r := 'ok'; ELSE r := 'refused'; END IF;"
      " ELSE UPDATE %s.slots SET reserved = reserved + 1 WHERE id = tgt; r := 'ok'; END IF;"
      " IF r = 'ok' THEN INSERT INTO %s.effects VALUES (k, kind); END IF;"
      " UPDATE %s.idem SET result = r, applied = (r = 'ok') WHERE key = k;"
      " RETURN r; END $f$",
      schema, schema, schema, schema, schema, schema, schema, schema);
  kt_pg_execf(
      "CREATE FUNCTION %s.undo(ck text, ak text, kind text, tgt int, amt int) RETURNS text"
      " LANGUAGE plpgsql AS $f$ DECLARE r text; a bool; BEGIN"
      /* tombstone: an action that never ran (or runs late) will be refused */
      " INSERT INTO %s.idem (key, result) VALUES (ak, 'tombstone') ON CONFLICT DO NOTHING;"
      " IF FOUND THEN INSERT INTO %s.idem (key, result) VALUES (ck, 'nothing')"
      "  ON CONFLICT DO NOTHING; RETURN 'nothing'; END IF;"
      " INSERT INTO %s.idem (key) VALUES (ck) ON CONFLICT DO NOTHING;"
      " IF NOT FOUND THEN RETURN 'replay'; END IF;"
      " SELECT i.applied INTO a FROM %s.idem i WHERE i.key = ak;"
      " IF a THEN"
      "  IF kind = 'book' THEN UPDATE %s.items SET booked = booked - 1 WHERE id = tgt;"
      "  ELSE UPDATE %s.wallets SET balance = balance + amt WHERE id = tgt; END IF;"
      "  INSERT INTO %s.effects VALUES (ck, 'un' || kind); r := 'ok';"
      " ELSE r := 'nothing'; END IF;"
      " UPDATE %s.idem SET result = r, applied = (r = 'ok') WHERE key = ck;"
      " RETURN r; END $f$",
      schema, schema, schema, schema, schema, schema, schema, schema, schema);
}

static inline void world_init(world *w, const char *prefix, int n, int balance) {
  memset(w, 0, sizeof *w);
  cr_assert_eq(uv_loop_init(&w->loop), 0);
  kt_unique_name(w->schema, sizeof w->schema, prefix);
  participants_install(w->schema, n, balance);
}

/* Fills w->o and w->steps (the seed's saga); the caller may change them. */
static inline void world_opts(world *w) {
  keel_saga_step_init(&w->steps[0], "book_item", s_book, s_release);
  keel_saga_step_init(&w->steps[1], "charge_wallet", s_charge, NULL);
  w->steps[1].kind = KEEL_SAGA_PIVOT;
  keel_saga_step_init(&w->steps[2], "reserve_slot", s_reserve, NULL);
  w->steps[2].kind = KEEL_SAGA_RETRIABLE;
  for (int i = 0; i < 3; i++) keel_backoff_exponential(&w->steps[i].backoff, 10, 2.0, 100);
  keel_saga_opts_init(&w->o);
  w->o.conninfo = kt_pg_conninfo();
  w->o.schema = w->schema;
  w->o.type = "order";
  w->o.steps = w->steps;
  w->o.nsteps = 3;
  w->o.lease_ms = 10000; /* a lost lease runs the saga twice (safe, but counts differ) */
  w->o.poll_ms = 200;
  w->o.pool_size = 2;
  w->o.stats_ms = 0;
  w->o.on_ready = w_ready;
  w->o.on_stuck = w_stuck;
  w->o.on_end = w_end;
  w->o.data = w;
}

static inline void world_start_objects(world *w) {
  w->ready = false;
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 2;
  cr_assert_eq(keel_pg_pool_new(&w->loop, &po, &w->pp), 0);
  char why[200];
  int rc = keel_saga_new_ex(&w->loop, &w->o, &w->s, why, sizeof why);
  cr_assert_eq(rc, 0, "keel_saga_new: %s", why);
  cr_assert(kt_run_until(&w->loop, &w->ready, 30000), "saga never ready");
  cr_assert_eq(w->ready_status, 0, "ready: %s", keel_saga_last_error(w->s));
}

static inline void on_started(keel_saga *s, int status, int64_t id, bool existed, void *data) {
  (void)s, (void)existed;
  world *w = data;
  w->started++;
  if (status != 0) w->start_status = status;
  if (status == 0 && w->nids < 2048) w->ids[w->nids++] = id;
}

/* Starts a saga for participants number i with amount. */
static inline void world_start(world *w, int i, int amount, uint64_t deadline_ms) {
  char d[128];
  snprintf(d, sizeof d, "{\"item\":%d,\"wallet\":%d,\"slot\":%d,\"amount\":%d}", i, i, i, amount);
  keel_saga_start_opts so;
  keel_saga_start_opts_init(&so);
  so.data = d;
  so.deadline_ms = deadline_ms;
  cr_assert_eq(keel_saga_start(w->s, &so, on_started, w), 0);
}

static inline void world_closed(void *obj, void *data) {
  (void)obj;
  ((world *)data)->closed = true;
}
static inline void pool_closed(void *obj, void *data) {
  (void)obj, (void)data;
}

static inline void world_finish(world *w) {
  if (w->s) keel_saga_close(w->s, world_closed, w);
  if (w->pp) keel_pg_pool_close(w->pp, pool_closed, NULL);
  w->s = NULL;
  w->pp = NULL;
  kt_loop_finish(&w->loop);
}

/* Counts of one saga's state by query. */
static inline char *saga_state(world *w, int64_t id) {
  return kt_pg_scalarf("SELECT state FROM %s.saga_instances WHERE id = %" PRId64, w->schema, id);
}

typedef struct all_terminal_ctx {
  world *w;
  uint64_t last;
  bool yes;
} all_terminal_ctx;

/* A number from a query whose every %s is schema (at most four). */
static inline long schema_count(const char *fmt, const char *schema) {
  char *v = kt_pg_scalarf(fmt, schema, schema, schema, schema);
  long n = v ? strtol(v, NULL, 10) : -1;
  free(v);
  return n;
}

static inline long world_open_count(world *w) {
  char *v = kt_pg_scalarf(
      "SELECT count(*) FROM %s.saga_instances WHERE state IN "
      "('running','compensating')",
      w->schema);
  long n = strtol(v, NULL, 10);
  free(v);
  return n;
}

#endif
