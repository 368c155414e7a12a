/* The integrity helpers through the real PgBouncer in transaction mode
 * (issue 20): versioned updates (which failed with 42P05 or ran another
 * client's statement), concurrent slug inserts (25P02 follow-ons, and a
 * session check that a pooler always fails), keel_tx_run and
 * keel_occ_retry, also when the pool finds the pooler inside a
 * transaction; and after every error path no server connection is left
 * inside a transaction. Each test has a database of its own: its PgBouncer
 * pool holds only its own server connections. */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/integrity.h"
#include "support/harness.h"

#define NPOOLS 3

typedef struct fx {
  uv_loop_t loop;
  char db[64];
  char direct[512];
  char pooled[512];
  PGconn *admin;      /* straight to the server, this database */
  PGconn *other;      /* another client through the pooler */
  char other_pid[16]; /* its server connection while it holds one ("0": none) */
  keel_pg_pool *pools[NPOOLS];
  keel_integrity *igs[NPOOLS];
  int done;
  int statuses[256];
  char versions[256][64];
  unsigned attempts[256];
} fx;

static char *pq_scalar(PGconn *conn, const char *sql) {
  PGresult *res = PQexec(conn, sql);
  ExecStatusType st = PQresultStatus(res);
  cr_assert(st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK, "%s: %s", sql,
            PQresultErrorMessage(res));
  char *v = NULL;
  if (st == PGRES_TUPLES_OK && PQntuples(res) > 0 && !PQgetisnull(res, 0, 0))
    v = strdup(PQgetvalue(res, 0, 0));
  PQclear(res);
  return v;
}

static void pq_run(PGconn *conn, const char *sql) {
  free(pq_scalar(conn, sql));
}

static PGconn *pq_open(const char *conninfo) {
  PGconn *conn = PQconnectdb(conninfo);
  cr_assert_eq(PQstatus(conn), CONNECTION_OK, "%s", PQerrorMessage(conn));
  return conn;
}

static void setup(fx *f, const char *schema) {
  memset(f, 0, sizeof *f);
  uv_loop_init(&f->loop);
  kt_unique_name(f->db, sizeof f->db, "igdb");
  kt_pg_execf("CREATE DATABASE %s TEMPLATE template0", f->db);
  snprintf(f->direct, sizeof f->direct, "%s dbname=%s", kt_pg_direct_conninfo(), f->db);
  snprintf(f->pooled, sizeof f->pooled, "%s dbname=%s", kt_pg_pooler_conninfo(), f->db);
  f->admin = pq_open(f->direct);
  pq_run(f->admin, schema);
  pq_run(f->admin, "CREATE TABLE victim (v text)");
  /* Another client left statements under the names keel used to choose
   * on the pool's (so far only) server connection. */
  f->other = pq_open(f->pooled);
  snprintf(f->other_pid, sizeof f->other_pid, "0");
  for (int i = 0; i < 8; i++) {
    char sql[200];
    snprintf(sql, sizeof sql,
             "PREPARE keel_s%d(text, text, text) AS INSERT INTO victim VALUES ($1) RETURNING "
             "'other client', $2, $3",
             i);
    pq_run(f->other, sql);
  }
  for (int i = 0; i < NPOOLS; i++) {
    keel_pg_pool_opts po;
    keel_pg_pool_opts_init(&po);
    po.conn.conninfo = f->pooled;
    po.size = 4;
    cr_assert_eq(keel_pg_pool_new(&f->loop, &po, &f->pools[i]), 0);
    cr_assert_eq(keel_integrity_new(&f->loop, f->pools[i], NULL, &f->igs[i]), 0);
  }
}

static void expect_no_idle_in_transaction(fx *f, const char *after) {
  char sql[400];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_stat_activity WHERE datname = '%s' AND state LIKE 'idle in "
           "transaction%%' AND pid <> %s",
           f->db, f->other_pid);
  char *n = pq_scalar(f->admin, sql);
  cr_expect_str_eq(n, "0", "after %s: a server connection was left inside a transaction", after);
  free(n);
}

static void teardown(fx *f) {
  char *n = pq_scalar(f->admin, "SELECT count(*) FROM victim");
  cr_expect_str_eq(n, "0", "another client's statement ran under keel's name");
  free(n);
  for (int i = 0; i < NPOOLS; i++) {
    keel_integrity_close(f->igs[i], NULL, NULL);
    keel_pg_pool_close(f->pools[i], NULL, NULL);
  }
  kt_loop_finish(&f->loop);
  PQfinish(f->other);
  PQfinish(f->admin);
  kt_pg_execf("DROP DATABASE IF EXISTS %s WITH (FORCE)", f->db);
}

static void wait_done(fx *f, int n) {
  uint64_t start = uv_now(&f->loop);
  while (f->done < n && uv_now(&f->loop) - start < 30000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(f->done, n, "%d of %d done", f->done, n);
}

/* The other client holds a server connection inside a transaction: the
 * next statements of keel go to another one. */
static void other_holds_a_server(fx *f) {
  pq_run(f->other, "BEGIN");
  char *pid = pq_scalar(f->other, "SELECT pg_backend_pid()");
  snprintf(f->other_pid, sizeof f->other_pid, "%s", pid);
  free(pid);
}

static void other_lets_go(fx *f) {
  pq_run(f->other, "ROLLBACK");
  snprintf(f->other_pid, sizeof f->other_pid, "0");
}

/* ---- versioned updates --------------------------------------------------- */

typedef struct chain {
  fx *f;
  keel_integrity *ig;
  char key[8];
  char version[32];
  int left;
  int status;
  bool over;
} chain;

static void chain_next(chain *c);

static void on_chain(keel_integrity *ig, int status, const char *version, bool inserted,
                     void *data) {
  (void)ig;
  (void)inserted;
  chain *c = data;
  if (status != 0) {
    c->status = status;
    c->over = true;
    c->f->done++;
    return;
  }
  snprintf(c->version, sizeof c->version, "%s", version);
  if (--c->left == 0) {
    c->over = true;
    c->f->done++;
    return;
  }
  chain_next(c);
}

static void chain_next(chain *c) {
  const char *cols[] = {"name"};
  const char *vals[] = {c->version};
  keel_occ_spec s = {.table = "cards",
                     .key_column = "id",
                     .key_value = c->key,
                     .version_column = "version",
                     .expected_version = c->version,
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  cr_assert_eq(keel_occ_update(c->ig, &s, on_chain, c), 0);
}

#define CARDS_SCHEMA                                                                        \
  "CREATE TABLE cards (id int PRIMARY KEY, name text, version bigint NOT NULL DEFAULT 1); " \
  "INSERT INTO cards (id) SELECT g FROM generate_series(1, 12) g"

/* Issue 20: versioned updates failed 3-4 times in 4 with 42P05 and one ran
 * another client's statement. Three pools (three processes) update twelve
 * rows, twenty times each, while another client holds a server connection
 * half of the time. */
Test(integrity_pooler, versioned_updates_from_three_pools) {
  fx f;
  setup(&f, CARDS_SCHEMA);
  static chain chains[12];
  for (int i = 0; i < 12; i++) {
    chains[i] = (chain){.f = &f, .ig = f.igs[i % NPOOLS], .left = 20};
    snprintf(chains[i].key, sizeof chains[i].key, "%d", i + 1);
    snprintf(chains[i].version, sizeof chains[i].version, "1");
    chain_next(&chains[i]);
  }
  uint64_t start = uv_now(&f.loop);
  bool holding = false;
  while (f.done < 12 && uv_now(&f.loop) - start < 60000) {
    uv_run(&f.loop, UV_RUN_NOWAIT);
    /* Now and then the other client takes a server connection away. */
    if (!holding && (uv_now(&f.loop) - start) % 200 < 100) {
      other_holds_a_server(&f);
      holding = true;
    } else if (holding && (uv_now(&f.loop) - start) % 200 >= 100) {
      other_lets_go(&f);
      holding = false;
    }
    uv_sleep(1);
  }
  if (holding) other_lets_go(&f);
  cr_assert_eq(f.done, 12);
  for (int i = 0; i < 12; i++) {
    cr_expect_eq(chains[i].status, 0, "row %d: %s (%s)", i + 1, keel_err_name(chains[i].status),
                 keel_integrity_last_error(chains[i].ig));
    cr_expect_str_eq(chains[i].version, "21");
  }
  char *sum = pq_scalar(f.admin, "SELECT sum(version) FROM cards");
  cr_expect_str_eq(sum, "252");
  free(sum);
  expect_no_idle_in_transaction(&f, "versioned updates");
  teardown(&f);
}

/* ---- slugs ------------------------------------------------------------------- */

typedef struct slug_seen {
  fx *f;
  char slugs[64][128];
} slug_seen;

static void on_slug(keel_integrity *ig, int status, const char *slug_text, void *data) {
  (void)ig;
  slug_seen *s = data;
  int i = s->f->done++;
  s->f->statuses[i] = status;
  snprintf(s->slugs[i], 128, "%s", slug_text ? slug_text : "");
}

/* Issue 20: concurrent slug inserts failed 5 in 8 with 25P02 follow-ons
 * (and the insert's check of its backend's pid can never hold through a
 * pooler). */
Test(integrity_pooler, concurrent_slug_inserts_from_three_pools) {
  fx f;
  setup(&f, "CREATE TABLE posts (id serial PRIMARY KEY, slug text UNIQUE NOT NULL, owner int)");
  static slug_seen seen;
  memset(&seen, 0, sizeof seen);
  seen.f = &f;
  const char *cols[] = {"owner"};
  const char *vals[] = {"7"};
  keel_slug_spec spec = {.table = "posts",
                         .slug_column = "slug",
                         .name = "Crème Brûlée",
                         .columns = cols,
                         .values = vals,
                         .count = 1};
  for (int i = 0; i < 30; i++)
    cr_assert_eq(keel_slug_insert(f.igs[i % NPOOLS], &spec, on_slug, &seen), 0);
  wait_done(&f, 30);
  for (int i = 0; i < 30; i++) {
    cr_expect_eq(f.statuses[i], 0, "creator %d: %s (%s)", i, keel_err_name(f.statuses[i]),
                 keel_integrity_last_error(f.igs[i % NPOOLS]));
    for (int j = 0; j < i; j++) cr_expect_str_neq(seen.slugs[i], seen.slugs[j]);
  }
  char *n = pq_scalar(f.admin, "SELECT count(DISTINCT slug) FROM posts");
  cr_expect_str_eq(n, "30");
  free(n);
  expect_no_idle_in_transaction(&f, "slug inserts");
  teardown(&f);
}

/* ---- transactions and every error path ---------------------------------------- */

typedef struct step {
  fx *f;
  const char *sql[3]; /* run in order inside the transaction */
  int finish_with;
  int at;
} step;

static void step_next(keel_pg *conn, int status, const keel_pg_result *res, void *data);

static keel_pg_tx *current_tx;

static void step_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  step *s = data;
  current_tx = tx;
  s->at = 0;
  step_next(conn, 0, NULL, s);
}

static void step_next(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  step *s = data;
  if (status != 0) {
    keel_pg_tx_done(current_tx, keel_sqlstate_map(status, res));
    return;
  }
  if (s->at == 3 || s->sql[s->at] == NULL) {
    keel_pg_tx_done(current_tx, s->finish_with);
    return;
  }
  const char *sql = s->sql[s->at++];
  cr_assert_eq(keel_pg_query_cached(conn, sql, 0, NULL, step_next, s), 0);
}

static void on_tx(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  fx *f = data;
  int i = f->done++;
  f->statuses[i] = status;
  f->attempts[i] = attempts;
}

static void on_occ_retry(keel_integrity *ig, int status, const char *version, unsigned attempts,
                         void *data) {
  (void)ig;
  fx *f = data;
  int i = f->done++;
  f->statuses[i] = status;
  f->attempts[i] = attempts;
  snprintf(f->versions[i], 64, "%s", version ? version : "(null)");
}

static int mutate_ok(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                     void *data) {
  (void)ig;
  (void)row;
  (void)data;
  values_out[0] = "mutated";
  return 0;
}

static int mutate_abort(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                        void *data) {
  (void)ig;
  (void)row;
  (void)values_out;
  (void)data;
  return KEEL_EABORTED;
}

static step *the_step;

static void step_body_global(keel_pg_tx *tx, keel_pg *conn, void *data) {
  (void)data;
  step_body(tx, conn, the_step);
}

static void run_step(fx *f, step *s, int want, const char *what) {
  s->f = f;
  the_step = s;
  int n = f->done;
  cr_assert_eq(keel_tx_run(f->igs[0], KEEL_PG_READ_COMMITTED, NULL, step_body_global, on_tx, f), 0);
  wait_done(f, n + 1);
  cr_expect_eq(f->statuses[n], want, "%s: %s (%s)", what, keel_err_name(f->statuses[n]),
               keel_integrity_last_error(f->igs[0]));
  expect_no_idle_in_transaction(f, what);
}

Test(integrity_pooler, tx_run_and_occ_retry_and_no_transaction_left_open) {
  fx f;
  setup(&f, CARDS_SCHEMA
        "; CREATE TABLE later (id int PRIMARY KEY, ref int REFERENCES cards (id) DEFERRABLE "
        "INITIALLY DEFERRED)");
  /* A transaction that commits, with the names keel prepared first. */
  step ok = {.sql = {"UPDATE cards SET name = 'tx' WHERE id = 1", "SELECT 1"}};
  run_step(&f, &ok, 0, "a committed transaction");
  /* The pool's server connection is taken: inside the next transaction
   * keel's names are unknown (26000), the attempt fails with KEEL_ECONN
   * and runs again, unnamed. */
  other_holds_a_server(&f);
  run_step(&f, &ok, 0, "a transaction at the detection");
  cr_expect_geq(f.attempts[f.done - 1], 1);
  keel_pg_pool_stats ps;
  keel_pg_pool_get_stats(f.pools[0], &ps);
  cr_expect(ps.unnamed || f.attempts[f.done - 1] == 1);
  /* Error paths: each ends with ROLLBACK through the pooler. */
  step user_error = {.sql = {"UPDATE cards SET name = 'no' WHERE id = 2"},
                     .finish_with = KEEL_EABORTED};
  run_step(&f, &user_error, KEEL_EABORTED, "the body's own error");
  step sql_error = {.sql = {"UPDATE cards SET name = 'no' WHERE id = 2", "SELECT 1 / 0"}};
  run_step(&f, &sql_error, KEEL_EPG, "a failing statement");
  step unique = {.sql = {"INSERT INTO cards (id) VALUES (1)"}};
  run_step(&f, &unique, KEEL_EUNIQUE, "a unique violation");
  step at_commit = {.sql = {"INSERT INTO later VALUES (1, 999)"}};
  run_step(&f, &at_commit, KEEL_EPG, "a deferred constraint failing at COMMIT");
  other_lets_go(&f);
  /* occ_retry: success, conflict retried, mutate's abort, a missing row. */
  const char *cols[] = {"name"};
  keel_occ_spec s = {.table = "cards",
                     .key_column = "id",
                     .key_value = "3",
                     .version_column = "version",
                     .set_columns = cols,
                     .set_count = 1};
  for (int i = 0; i < 6; i++)
    cr_assert_eq(keel_occ_retry(f.igs[i % NPOOLS], &s, NULL, mutate_ok, on_occ_retry, &f), 0);
  int n = f.done;
  uint64_t start = uv_now(&f.loop);
  while (f.done < n + 6 && uv_now(&f.loop) - start < 30000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.done, n + 6);
  for (int i = n; i < n + 6; i++) cr_expect_eq(f.statuses[i], 0, "occ_retry %d", i - n);
  char *v = pq_scalar(f.admin, "SELECT version FROM cards WHERE id = 3");
  cr_expect_str_eq(v, "7", "six increments, none lost");
  free(v);
  expect_no_idle_in_transaction(&f, "occ_retry with conflicts");
  cr_assert_eq(keel_occ_retry(f.igs[0], &s, NULL, mutate_abort, on_occ_retry, &f), 0);
  wait_done(&f, n + 7);
  cr_expect_eq(f.statuses[n + 6], KEEL_EABORTED);
  expect_no_idle_in_transaction(&f, "occ_retry aborted by mutate");
  s.key_value = "999";
  cr_assert_eq(keel_occ_retry(f.igs[1], &s, NULL, mutate_ok, on_occ_retry, &f), 0);
  wait_done(&f, n + 8);
  cr_expect_eq(f.statuses[n + 7], KEEL_ENOTFOUND);
  expect_no_idle_in_transaction(&f, "occ_retry on a missing row");
  teardown(&f);
}

/* ---- versioned updates as one simple query ------------------------------ */

typedef struct one_update {
  fx *f;
  int status;
  char version[64];
  bool over;
} one_update;

static void on_one_update(keel_integrity *ig, int status, const char *version, bool inserted,
                          void *data) {
  (void)ig;
  (void)inserted;
  one_update *u = data;
  u->status = status;
  snprintf(u->version, sizeof u->version, "%s", version != NULL ? version : "");
  u->over = true;
}

static one_update update_name(fx *f, keel_integrity *ig, const char *key, const char *expected,
                              const char *name) {
  const char *cols[] = {"name"};
  const char *vals[] = {name};
  keel_occ_spec s = {.table = "cards",
                     .key_column = "id",
                     .key_value = key,
                     .version_column = "version",
                     .expected_version = expected,
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  one_update u = {.f = f};
  cr_assert_eq(keel_occ_update(ig, &s, on_one_update, &u), 0);
  uint64_t start = uv_now(&f->loop);
  while (!u.over && uv_now(&f->loop) - start < 30000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert(u.over, "the update did not finish");
  return u;
}

/* Through a transaction pooler a versioned update goes as one simple query
 * with its values as quoted literals (keel__pg_pool_query_literal): every
 * value arrives exactly as given (quotes, $n, an injection attempt, UTF-8,
 * the empty string, NULL; a backslash goes the unnamed extended way), the
 * outcomes are those of the parameterised statement, and the server saw
 * the literal form (the last statement of its server connection has no
 * $n). */
Test(integrity_pooler, versioned_update_values_arrive_exactly_as_literals) {
  fx f;
  setup(&f, CARDS_SCHEMA);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = f.pooled;
  po.conn.statement_mode = KEEL_PG_STATEMENTS_UNNAMED;
  po.size = 1;
  keel_pg_pool *pool;
  keel_integrity *ig;
  cr_assert_eq(keel_pg_pool_new(&f.loop, &po, &pool), 0);
  cr_assert_eq(keel_integrity_new(&f.loop, pool, NULL, &ig), 0);
  static const char *const names[] = {"O'Brien",
                                      "it''s '' \"quoted\"",
                                      "$1 $2 $3 '$1'",
                                      "'); DELETE FROM cards; --",
                                      "zażółć gęślą",
                                      "",
                                      "back\\slash \\' \\\\",
                                      NULL,
                                      "E'\\x41'",
                                      "end"};
  int n = (int)(sizeof names / sizeof names[0]);
  char expected[16] = "1";
  for (int i = 0; i < n; i++) {
    one_update u = update_name(&f, ig, "3", expected, names[i]);
    cr_assert_eq(u.status, 0, "value %d: %s (%s)", i, keel_err_name(u.status),
                 keel_integrity_last_error(ig));
    snprintf(expected, sizeof expected, "%d", i + 2);
    cr_assert_str_eq(u.version, expected, "value %d", i);
    PGresult *res = PQexec(f.admin, "SELECT name, version FROM cards WHERE id = 3");
    cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    if (names[i] == NULL)
      cr_expect(PQgetisnull(res, 0, 0), "value %d: NULL became '%s'", i, PQgetvalue(res, 0, 0));
    else
      cr_expect_str_eq(PQgetvalue(res, 0, 0), names[i], "value %d", i);
    cr_expect_str_eq(PQgetvalue(res, 0, 1), expected);
    PQclear(res);
  }
  /* The last one went as a simple query: the server shows its literals. */
  char sql[300];
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_stat_activity WHERE datname = '%s' AND query LIKE "
           "'UPDATE \"cards\" SET \"name\" = ''end''%%'",
           f.db);
  char *seen = pq_scalar(f.admin, sql);
  cr_expect_str_eq(seen, "1", "the update was not sent as one simple query");
  free(seen);
  /* A conflict, a missing row, a bad version: as with parameters. */
  one_update u = update_name(&f, ig, "3", "1", "x");
  cr_expect_eq(u.status, KEEL_ECONFLICT, "%s", keel_err_name(u.status));
  cr_expect_str_eq(u.version, expected);
  u = update_name(&f, ig, "99", "1", "x");
  cr_expect_eq(u.status, KEEL_ENOTFOUND, "%s", keel_err_name(u.status));
  u = update_name(&f, ig, "3", "not a number", "x");
  cr_expect_neq(u.status, 0);
  cr_expect_str_eq(keel_integrity_last_sqlstate(ig), "22P02", "%s", keel_integrity_last_error(ig));
  char *count = pq_scalar(f.admin, "SELECT count(*) FROM cards");
  cr_expect_str_eq(count, "12");
  free(count);
  expect_no_idle_in_transaction(&f, "versioned updates as simple queries");
  keel_integrity_close(ig, NULL, NULL);
  keel_pg_pool_close(pool, NULL, NULL);
  teardown(&f);
}
