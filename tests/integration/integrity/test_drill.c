/* Fault drills (issue 14): 20 concurrent incrementers through keel_tx_run
 * (half of them with an idempotency key) and 20 through keel_occ_retry,
 * for about 10 s each, while the pool's own backends are killed with
 * pg_terminate_backend every 200-500 ms (seeded), and again through a TCP
 * proxy that cuts connections at random points of the reply stream
 * (before or after a CommandComplete, so also between a result and its
 * sync). Every attempt writes a token in the same transaction (tx: an
 * INSERT; occ: a trigger on the counter row), so at the end the test knows
 * exactly which attempts committed:
 *   - final value = number of committed tokens,
 *   - every reported success committed exactly once,
 *   - every certain failure committed nothing, every operation at most once,
 *   - final value = successes + the in-doubt outcomes that did commit.
 * The figures are printed (grep "drill "). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../pg/pgproxy.h"
#include "keel/integrity.h"
#include "support/harness.h"

#define RUNNERS 20
#define MAX_OPS 8192
#define DRILL_MS 10000

enum { OUT_RUNNING = 0, OUT_SUCCESS, OUT_INDOUBT, OUT_FAILED };

typedef struct op_rec {
  unsigned char outcome;
  unsigned short attempts; /* attempts the test saw start (tokens a1..aN) */
  int status;
} op_rec;

struct drill;

typedef struct runner {
  struct drill *d;
  int id;
  int seq;
  bool idempotent;
  bool finished;
  keel_pg_tx *tx;
  char token[64];
  op_rec ops[MAX_OPS];
} runner;

typedef struct drill {
  uv_loop_t loop;
  keel_pg_pool *pool;
  keel_integrity *ig;
  keel_pg *killer;
  pgproxy *proxy;
  bool occ;
  bool use_proxy;
  keel_version_kind kind;
  char conninfo[700];
  char app[80];
  char table[64];
  char tokens[80];
  unsigned seed;
  uint64_t end_at;
  bool stopping;
  uv_timer_t fault_timer;
  int faults;
  int running;
  runner runners[RUNNERS];
} drill;

static unsigned next_rand(drill *d) {
  d->seed = d->seed * 1103515245u + 12345u;
  return (d->seed >> 16) & 0x7fff;
}

static void start_op(runner *r);

static void op_done(runner *r, int status) {
  drill *d = r->d;
  op_rec *op = &r->ops[r->seq];
  op->status = status;
  op->outcome = status == 0 ? OUT_SUCCESS : status == KEEL_EINDOUBT ? OUT_INDOUBT : OUT_FAILED;
  r->seq++;
  if (uv_now(&d->loop) >= d->end_at || r->seq >= MAX_OPS) {
    r->finished = true;
    d->running--;
    return;
  }
  start_op(r);
}

/* ---- keel_tx_run incrementers ----------------------------------------------- */

static void after_update(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  runner *r = data;
  keel_pg_tx_finish(r->tx, status);
}

static void tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  runner *r = data;
  drill *d = r->d;
  r->tx = tx;
  op_rec *op = &r->ops[r->seq];
  op->attempts++;
  snprintf(r->token, sizeof r->token, "%d_%d_%d", r->id, r->seq, op->attempts);
  char sql[256];
  snprintf(sql, sizeof sql, "INSERT INTO %s (token) VALUES ($1)", d->tokens);
  const char *values[] = {r->token};
  int rc = keel_pg_query_cached(conn, sql, 1, values, NULL, NULL);
  if (rc == 0) {
    snprintf(sql, sizeof sql, "UPDATE %s SET n = n + 1 WHERE id = 1", d->table);
    rc = keel_pg_query_cached(conn, sql, 0, NULL, after_update, r);
  }
  if (rc != 0) keel_pg_tx_finish(tx, rc);
}

static void tx_done(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  (void)attempts;
  op_done(data, status);
}

/* ---- keel_occ_retry incrementers ---------------------------------------------- */

static int occ_mutate(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                      void *data) {
  (void)values_out;
  runner *r = data;
  op_rec *op = &r->ops[r->seq];
  op->attempts++;
  char n[32];
  snprintf(n, sizeof n, "%ld", strtol(keel_pg_result_get(row, 0, "n"), NULL, 10) + 1);
  snprintf(r->token, sizeof r->token, "%d_%d_%d", r->id, r->seq, op->attempts);
  int rc = keel_occ_set_value(ig, 0, n);
  return rc != 0 ? rc : keel_occ_set_value(ig, 1, r->token);
}

static void occ_done(keel_integrity *ig, int status, const char *version, unsigned attempts,
                     void *data) {
  (void)ig;
  (void)version;
  (void)attempts;
  op_done(data, status);
}

static void start_op(runner *r) {
  drill *d = r->d;
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  keel_backoff_full_jitter(&ro.backoff, 2, 2.0, 100);
  ro.max_attempts = 400;
  ro.seed = (uint64_t)(r->id + 1) * 7919u + (uint64_t)r->seq;
  int rc;
  if (d->occ) {
    static const char *cols[] = {"n", "token"};
    keel_occ_spec s = {.table = d->table,
                       .key_column = "id",
                       .key_value = "1",
                       .version_column = "version",
                       .version_kind = d->kind,
                       .set_columns = cols,
                       .set_count = 2};
    rc = keel_occ_retry(d->ig, &s, &ro, occ_mutate, occ_done, r);
  } else if (r->idempotent) {
    char key[96];
    snprintf(key, sizeof key, "%s_%d_%d", d->table, r->id, r->seq);
    rc = keel_tx_run_idempotent(d->ig, KEEL_PG_READ_COMMITTED, &ro, key, tx_body, tx_done, r);
  } else {
    rc = keel_tx_run(d->ig, KEEL_PG_READ_COMMITTED, &ro, tx_body, tx_done, r);
  }
  cr_assert_eq(rc, 0, "%s", keel_integrity_last_error(d->ig));
}

/* ---- faults -------------------------------------------------------------------- */

static void ignore(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)status;
  (void)res;
  (void)data;
}

static void on_fault(uv_timer_t *t) {
  drill *d = t->data;
  if (d->stopping) return;
  d->faults++;
  if (d->use_proxy) {
    static const char *const tags[] = {"COMMIT", "UPDATE", "INSERT", "SELECT", "BEGIN"};
    pgproxy_cut_at(d->proxy, tags[next_rand(d) % 5], next_rand(d) % 2 == 0);
  } else {
    /* This test's own pool backends only (by application_name). */
    const char *values[] = {d->app};
    keel_pg_query(d->killer,
                  "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                  "application_name = $1 AND pid <> pg_backend_pid() ORDER BY random() LIMIT 1",
                  1, values, ignore, NULL);
  }
  uv_timer_start(&d->fault_timer, on_fault, 200 + next_rand(d) % 301, 0);
}

/* ---- the drill ------------------------------------------------------------------ */

static bool closed_flag;
static void on_closed(void *obj, void *data) {
  (void)obj;
  *(bool *)data = true;
}

static void run_drill(bool occ, bool use_proxy, keel_version_kind kind, unsigned seed) {
  static drill d;
  memset(&d, 0, sizeof d);
  d.occ = occ;
  d.use_proxy = use_proxy;
  d.kind = kind;
  d.seed = seed;
  uv_loop_init(&d.loop);
  kt_unique_name(d.table, sizeof d.table, "drill");
  snprintf(d.tokens, sizeof d.tokens, "%s_tokens", d.table);
  snprintf(d.app, sizeof d.app, "%s_app", d.table);
  char sql[2048];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (token text PRIMARY KEY); "
           "CREATE TABLE %s (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, token text, "
           "version %s); INSERT INTO %s (id) VALUES (1); "
           "CREATE TABLE IF NOT EXISTS keel_tx_idempotency (key text PRIMARY KEY, "
           "committed_at timestamptz NOT NULL DEFAULT now())",
           d.tokens, d.table,
           kind == KEEL_VERSION_UUID ? "uuid NOT NULL DEFAULT gen_random_uuid()"
                                     : "bigint NOT NULL DEFAULT 1",
           d.table);
  kt_pg_exec(sql);
  if (occ) {
    snprintf(sql, sizeof sql,
             "CREATE FUNCTION %s_tok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
             "INSERT INTO %s (token) VALUES (NEW.token); RETURN NEW; END $$; "
             "CREATE TRIGGER tok AFTER UPDATE ON %s FOR EACH ROW WHEN (NEW.token IS DISTINCT "
             "FROM OLD.token) EXECUTE FUNCTION %s_tok()",
             d.table, d.tokens, d.table, d.table);
    kt_pg_exec(sql);
  }
  const char *base = kt_pg_conninfo();
  char via[512];
  if (use_proxy) {
    d.proxy = pgproxy_start(&d.loop, base, via, sizeof via);
    cr_assert_not_null(d.proxy);
    base = via;
  }
  snprintf(d.conninfo, sizeof d.conninfo, "%s application_name=%s", base, d.app);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = d.conninfo;
  po.size = 8;
  cr_assert_eq(keel_pg_pool_new(&d.loop, &po, &d.pool), 0);
  cr_assert_eq(keel_integrity_new(&d.loop, d.pool, NULL, &d.ig), 0);
  if (!use_proxy) {
    keel_pg_opts ko;
    keel_pg_opts_init(&ko);
    ko.conninfo = kt_pg_conninfo();
    cr_assert_eq(keel_pg_new(&d.loop, &ko, &d.killer), 0);
  }
  uv_timer_init(&d.loop, &d.fault_timer);
  d.fault_timer.data = &d;
  d.end_at = uv_now(&d.loop) + DRILL_MS;
  uv_timer_start(&d.fault_timer, on_fault, 200 + next_rand(&d) % 301, 0);
  d.running = RUNNERS;
  for (int i = 0; i < RUNNERS; i++) {
    runner *r = &d.runners[i];
    r->d = &d;
    r->id = i;
    r->idempotent = !occ && i % 2 == 1;
    start_op(r);
  }
  uint64_t hard_end = d.end_at + 60000;
  while (d.running > 0 && uv_now(&d.loop) < hard_end) {
    if (uv_now(&d.loop) >= d.end_at) d.stopping = true;
    uv_run(&d.loop, UV_RUN_ONCE);
  }
  cr_assert_eq(d.running, 0, "every runner ended");
  d.stopping = true;
  uv_timer_stop(&d.fault_timer);
  uv_close((uv_handle_t *)&d.fault_timer, NULL);
  keel_integrity_stats st;
  keel_integrity_get_stats(d.ig, &st);
  closed_flag = false;
  keel_integrity_close(d.ig, NULL, NULL);
  keel_pg_pool_close(d.pool, on_closed, &closed_flag);
  keel_pg_close(d.killer, NULL, NULL);
  if (d.proxy != NULL) pgproxy_stop(d.proxy);
  kt_loop_finish(&d.loop);

  /* What committed: one token per committed attempt. */
  snprintf(sql, sizeof sql, "SELECT n FROM %s WHERE id = 1", d.table);
  char *n_text = kt_pg_scalar(sql);
  long final = strtol(n_text, NULL, 10);
  free(n_text);
  snprintf(sql, sizeof sql, "SELECT coalesce(string_agg(token, ','), '') FROM %s", d.tokens);
  char *all = kt_pg_scalar(sql);
  static unsigned char committed[RUNNERS][MAX_OPS];
  memset(committed, 0, sizeof committed);
  long tokens = 0;
  for (char *p = all; p != NULL && *p != '\0';) {
    int rid = -1, seq = -1, att = -1;
    cr_assert_eq(sscanf(p, "%d_%d_%d", &rid, &seq, &att), 3, "token %.20s", p);
    cr_assert(rid >= 0 && rid < RUNNERS && seq >= 0 && seq < MAX_OPS);
    cr_assert_leq(att, (int)d.runners[rid].ops[seq].attempts, "a token of an attempt never made");
    committed[rid][seq]++;
    tokens++;
    p = strchr(p, ',');
    if (p != NULL) p++;
  }
  free(all);
  long ops = 0, successes = 0, unknowns = 0, unknown_committed = 0, failures = 0;
  long failed_committed = 0, lost_successes = 0, doubled = 0, idem_unknowns = 0;
  for (int i = 0; i < RUNNERS; i++) {
    runner *r = &d.runners[i];
    for (int s = 0; s < r->seq; s++) {
      op_rec *op = &r->ops[s];
      ops++;
      if (committed[i][s] > 1) doubled++;
      switch (op->outcome) {
        case OUT_SUCCESS:
          successes++;
          if (committed[i][s] != 1) lost_successes++;
          break;
        case OUT_INDOUBT:
          unknowns++;
          if (r->idempotent) idem_unknowns++;
          if (committed[i][s] > 0) unknown_committed++;
          break;
        default:
          failures++;
          if (failures <= 3)
            fprintf(stderr, "drill failure: runner %d op %d: %s after %u attempts\n", i, s,
                    keel_err_name(op->status), op->attempts);
          if (committed[i][s] > 0) failed_committed++;
          break;
      }
    }
  }
  fprintf(stderr,
          "drill %s via %s%s seed=%u: ops=%ld successes=%ld unknowns=%ld "
          "(committed %ld, idempotent %ld) failures=%ld final=%ld tokens=%ld faults=%d "
          "in_doubt_resolved=%llu already_committed=%llu retries=%llu\n",
          occ ? "keel_occ_retry" : "keel_tx_run", use_proxy ? "proxy cuts" : "backend kills",
          occ ? (kind == KEEL_VERSION_UUID ? " (uuid versions)" : " (integer versions)")
              : " (half idempotent)",
          seed, ops, successes, unknowns, unknown_committed, idem_unknowns, failures, final, tokens,
          d.faults, (unsigned long long)st.in_doubt_resolved,
          (unsigned long long)st.already_committed, (unsigned long long)st.retries);
  cr_assert_gt(d.faults, 10, "faults were injected");
  cr_assert_gt(successes, 0);
  cr_assert_eq(final, tokens, "one token per committed increment");
  cr_assert_eq(doubled, 0, "no operation applied twice");
  cr_assert_eq(lost_successes, 0, "every reported success committed exactly once");
  cr_assert_eq(failed_committed, 0, "certain failures committed nothing");
  cr_assert_eq(final, successes + unknown_committed,
               "final value = successes + in-doubt outcomes that committed");
  cr_assert_eq(idem_unknowns, 0, "idempotent transactions always find out");
  snprintf(sql, sizeof sql,
           "DROP TABLE %s; DROP TABLE %s; DELETE FROM keel_tx_idempotency WHERE key LIKE '%s_%%'",
           d.table, d.tokens, d.table);
  kt_pg_exec(sql);
  if (occ) {
    snprintf(sql, sizeof sql, "DROP FUNCTION %s_tok()", d.table);
    kt_pg_exec(sql);
  }
}

Test(drill, tx_run_incrementers_under_backend_kills, .timeout = 180) {
  run_drill(false, false, KEEL_VERSION_INTEGER, 14001);
}

Test(drill, occ_retry_incrementers_under_backend_kills, .timeout = 180) {
  run_drill(true, false, KEEL_VERSION_INTEGER, 14002);
}

Test(drill, tx_run_incrementers_through_a_cutting_proxy, .timeout = 180) {
  run_drill(false, true, KEEL_VERSION_INTEGER, 14003);
}

Test(drill, occ_retry_incrementers_through_a_cutting_proxy, .timeout = 180) {
  run_drill(true, true, KEEL_VERSION_UUID, 14004);
}
