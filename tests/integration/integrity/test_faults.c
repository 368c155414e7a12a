/* Integrity regressions (issues 13 and 14) against the real PostgreSQL:
 * values copied while mutate runs, on_retry's data, upsert races, the first
 * failing SQLSTATE of a transaction, idempotent transactions, generated
 * names of long and non-ASCII tables, slugs without pipelining, the
 * callback contract and allocation failure on every main path. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "integrity/integrity_internal.h"
#include "keel/integrity.h"
#include "support/harness.h"

typedef struct fx {
  uv_loop_t loop;
  keel_pg_pool *pool;
  keel_integrity *ig;
  char table[96];
  int done;
  int statuses[64];
  char versions[64][64];
  bool inserted[64];
  unsigned attempts[64];
} fx;

static void setup_pool(fx *f, unsigned pool_size, bool pipeline, const char *create_fmt) {
  memset(f, 0, sizeof *f);
  uv_loop_init(&f->loop);
  kt_unique_name(f->table, sizeof f->table, "igf");
  if (create_fmt != NULL) {
    char sql[2048];
    snprintf(sql, sizeof sql, create_fmt, f->table, f->table, f->table);
    kt_pg_exec(sql);
  }
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.conn.pipeline = pipeline;
  po.size = pool_size;
  cr_assert_eq(keel_pg_pool_new(&f->loop, &po, &f->pool), 0);
  cr_assert_eq(keel_integrity_new(&f->loop, f->pool, NULL, &f->ig), 0);
}

static void setup(fx *f, unsigned pool_size, const char *create_fmt) {
  setup_pool(f, pool_size, true, create_fmt);
}

static void teardown(fx *f) {
  keel_integrity_close(f->ig, NULL, NULL);
  keel_pg_pool_close(f->pool, NULL, NULL);
  kt_loop_finish(&f->loop);
  char sql[160];
  snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS \"%s\"", f->table);
  kt_pg_exec(sql);
}

static void wait_done(fx *f, int n) {
  uint64_t start = uv_now(&f->loop);
  while (f->done < n && uv_now(&f->loop) - start < 30000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(f->done, n, "%d of %d done", f->done, n);
}

static char *scalar(fx *f, const char *fmt) {
  char sql[512];
  snprintf(sql, sizeof sql, fmt, f->table);
  return kt_pg_scalar(sql);
}

static void on_occ(keel_integrity *ig, int status, const char *version, bool inserted, void *data) {
  (void)ig;
  fx *f = data;
  int i = f->done++;
  f->statuses[i] = status;
  snprintf(f->versions[i], 64, "%s", version ? version : "(null)");
  f->inserted[i] = inserted;
}

static void on_retried(keel_integrity *ig, int status, const char *version, unsigned attempts,
                       void *data) {
  (void)ig;
  fx *f = data;
  int i = f->done++;
  f->statuses[i] = status;
  f->attempts[i] = attempts;
  snprintf(f->versions[i], 64, "%s", version ? version : "(null)");
}

/* Waits until every member of the pool has a session (so that concurrent
 * statements really run concurrently). */
static void warm_up(fx *f, unsigned n) {
  for (int spins = 0; spins < 3000; spins++) {
    keel_pg_pool_stats st;
    keel_pg_pool_get_stats(f->pool, &st);
    if (st.connected >= n) return;
    uv_run(&f->loop, UV_RUN_NOWAIT);
    uv_sleep(1);
  }
  cr_assert_fail("the pool did not connect");
}

/* ---- #15: values copied while mutate runs; on_retry gets the user's data -- */

static int mutate_heap(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                       void *data) {
  fx *f = data;
  (void)values_out;
  long n = strtol(keel_pg_result_get(row, 0, "counter"), NULL, 10);
  char *buf = malloc(32); /* dies before mutate returns: keel must copy now */
  snprintf(buf, 32, "%ld", n + 1);
  int rc = keel_occ_set_value(ig, 0, buf);
  memset(buf, 'x', 31);
  free(buf);
  if (f->attempts[63]++ == 0) {
    /* First attempt: another writer moves the version on, so the update
     * conflicts and the loop retries (and calls on_retry). */
    char sql[256];
    snprintf(sql, sizeof sql, "UPDATE %s SET version = version + 1", f->table);
    kt_pg_exec(sql);
  }
  return rc;
}

static void *seen_on_retry_data;
static int on_retry_calls;
static int on_retry_statuses[8];
static char on_retry_sqlstates[8][6];

static void user_on_retry(keel_retry *r, unsigned next, int status, uint64_t delay_ms, void *data) {
  (void)r;
  (void)next;
  (void)delay_ms;
  seen_on_retry_data = data;
  if (on_retry_calls < 8) {
    fx *f = data;
    on_retry_statuses[on_retry_calls] = status;
    snprintf(on_retry_sqlstates[on_retry_calls], 6, "%s", keel_integrity_last_sqlstate(f->ig));
  }
  on_retry_calls++;
}

Test(faults, mutate_values_are_copied_before_it_returns_and_on_retry_gets_user_data) {
  fx f;
  setup(&f, 2,
        "CREATE TABLE %s (id int PRIMARY KEY, counter int NOT NULL, version bigint NOT NULL "
        "DEFAULT 1); INSERT INTO %s (id, counter) VALUES (1, 41); SELECT '%s'");
  const char *cols[] = {"counter"};
  keel_occ_spec s = {.table = f.table,
                     .key_column = "id",
                     .key_value = "1",
                     .version_column = "version",
                     .set_columns = cols,
                     .set_count = 1};
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  keel_backoff_fixed(&ro.backoff, 1);
  ro.max_attempts = 5;
  ro.on_retry = user_on_retry;
  cr_assert_eq(keel_occ_retry(f.ig, &s, &ro, mutate_heap, on_retried, &f), 0);
  wait_done(&f, 1);
  cr_assert_eq(f.statuses[0], 0, "%s", keel_integrity_last_error(f.ig));
  /* The conflict is retried once. Through a transaction pooler a retry may
   * also meet keel's detection of it (a prepared name unknown to the next
   * server connection: KEEL_ECONN, SQLSTATE 26000, documented in
   * docs/poolers.md), which is retried too. */
  cr_assert_geq(on_retry_calls, 1);
  cr_assert_leq(on_retry_calls, 3);
  cr_assert_eq(f.attempts[0], (unsigned)on_retry_calls + 1);
  int conflicts = 0;
  for (int i = 0; i < on_retry_calls; i++) {
    if (on_retry_statuses[i] == KEEL_ECONFLICT) {
      conflicts++;
      continue;
    }
    cr_assert(kt_behind_pooler(), "retry %d: %s", i, keel_err_name(on_retry_statuses[i]));
    cr_assert_eq(on_retry_statuses[i], KEEL_ECONN, "%s", keel_err_name(on_retry_statuses[i]));
    cr_assert_str_eq(on_retry_sqlstates[i], "26000");
  }
  cr_assert_eq(conflicts, 1);
  cr_assert_eq(seen_on_retry_data, &f, "on_retry gets the caller's data, not keel's");
  char *counter = scalar(&f, "SELECT counter FROM %s");
  cr_assert_str_eq(counter, "42");
  free(counter);
  /* Outside mutate the setter refuses. */
  cr_assert_eq(keel_occ_set_value(f.ig, 0, "1"), UV_EINVAL);
  teardown(&f);
}

/* ---- issue 14: concurrent first upserts of one key ------------------------- */

Test(faults, sixteen_first_upserts_one_insert_fifteen_conflicts_with_the_winners_version) {
  for (int round = 0; round < 3; round++) {
    fx f;
    setup(&f, 16,
          "CREATE TABLE %s (k text PRIMARY KEY, v text, version bigint NOT NULL DEFAULT 1); "
          "SELECT '%s', '%s'");
    warm_up(&f, 16);
    const char *cols[] = {"v"};
    const char *vals[] = {"x"};
    keel_occ_spec s = {.table = f.table,
                       .key_column = "k",
                       .key_value = "the-key",
                       .version_column = "version",
                       .expected_version = NULL,
                       .set_columns = cols,
                       .set_values = vals,
                       .set_count = 1};
    for (int i = 0; i < 16; i++) cr_assert_eq(keel_occ_upsert(f.ig, &s, on_occ, &f), 0);
    wait_done(&f, 16);
    int inserts = 0, conflicts = 0;
    for (int i = 0; i < 16; i++) {
      if (f.statuses[i] == 0) {
        cr_assert(f.inserted[i]);
        cr_assert_str_eq(f.versions[i], "1");
        inserts++;
      } else {
        cr_assert_eq(f.statuses[i], KEEL_ECONFLICT, "upsert %d: %s (%s)", i,
                     keel_err_name(f.statuses[i]), keel_integrity_last_error(f.ig));
        cr_assert_str_eq(f.versions[i], "1", "the conflict carries the winner's version");
        conflicts++;
      }
    }
    cr_assert_eq(inserts, 1);
    cr_assert_eq(conflicts, 15);
    teardown(&f);
  }
}

Test(faults, upsert_of_a_soft_deleted_row_is_not_found) {
  fx f;
  setup(&f, 2,
        "CREATE TABLE %s (k int PRIMARY KEY, v text, deleted_at timestamptz, version bigint NOT "
        "NULL DEFAULT 1); INSERT INTO %s (k, deleted_at) VALUES (1, now()); SELECT '%s'");
  const char *cols[] = {"v"};
  const char *vals[] = {"x"};
  keel_occ_spec s = {.table = f.table,
                     .key_column = "k",
                     .key_value = "1",
                     .version_column = "version",
                     .expected_version = "1",
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1,
                     .soft_delete_column = "deleted_at"};
  cr_assert_eq(keel_occ_upsert(f.ig, &s, on_occ, &f), 0);
  wait_done(&f, 1);
  cr_assert_eq(f.statuses[0], KEEL_ENOTFOUND);
  s.include_deleted = true;
  cr_assert_eq(keel_occ_upsert(f.ig, &s, on_occ, &f), 0);
  wait_done(&f, 2);
  cr_assert_eq(f.statuses[1], 0);
  cr_assert_str_eq(f.versions[1], "2");
  teardown(&f);
}

/* ---- issue 14: the first failing statement's SQLSTATE ---------------------- */

typedef struct three {
  fx *f;
  const char *second;
} three;

static void ignore(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)status;
  (void)res;
  (void)data;
}

static void three_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  three *t = data;
  keel_pg_query(conn, "SELECT 1", 0, NULL, ignore, NULL);
  keel_pg_query(conn, t->second, 0, NULL, ignore, NULL);
  keel_pg_query(conn, "SELECT 3", 0, NULL, ignore, NULL);
  keel_pg_tx_finish(tx, 0); /* all three and COMMIT pipelined */
}

static void on_tx(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  three *t = data;
  int i = t->f->done++;
  t->f->statuses[i] = status;
  t->f->attempts[i] = attempts;
}

Test(faults, the_first_failing_statements_sqlstate_is_reported_and_classified) {
  fx f;
  setup(&f, 2, NULL);
  static const struct {
    const char *sql, *state;
    int status;
    unsigned attempts;
  } cases[] = {
      {"DO $$BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END$$", "40001",
       KEEL_ESERIALIZATION, 3},
      {"DO $$BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40P01'; END$$", "40P01",
       KEEL_ESERIALIZATION, 3},
      {"DO $$BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '23505'; END$$", "23505", KEEL_EUNIQUE, 1},
      {"SELEC 2", "42601", KEEL_EPG, 1},
  };
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  keel_backoff_fixed(&ro.backoff, 1);
  ro.max_attempts = 3;
  for (int i = 0; i < 4; i++) {
    three t = {&f, cases[i].sql};
    cr_assert_eq(keel_tx_run(f.ig, KEEL_PG_READ_COMMITTED, &ro, three_body, on_tx, &t), 0);
    wait_done(&f, i + 1);
    cr_assert_eq(f.statuses[i], cases[i].status, "%s: got %s (%s)", cases[i].state,
                 keel_err_name(f.statuses[i]), keel_integrity_last_error(f.ig));
    cr_assert_str_eq(keel_integrity_last_sqlstate(f.ig), cases[i].state);
    cr_assert_eq(f.attempts[i], cases[i].attempts, "%s: retried only for 40001 and 40P01",
                 cases[i].state);
  }
  teardown(&f);
}

/* ---- issue 14: idempotent transactions ------------------------------------- */

static void installed(keel_integrity *ig, int status, void *data) {
  (void)ig;
  fx *f = data;
  f->statuses[f->done++] = status;
}

typedef struct inc {
  fx *f;
  keel_pg_tx *tx;
} inc;

static void after_inc(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  (void)res;
  inc *x = data;
  keel_pg_tx_finish(x->tx, status);
}

static void inc_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  inc *x = data;
  x->tx = tx;
  char sql[256];
  snprintf(sql, sizeof sql, "UPDATE %s SET n = n + 1", x->f->table);
  if (keel_pg_query(conn, sql, 0, NULL, after_inc, x) != 0) keel_pg_tx_finish(tx, UV_ENOMEM);
}

static void on_inc_done(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  inc *x = data;
  int i = x->f->done++;
  x->f->statuses[i] = status;
  x->f->attempts[i] = attempts;
}

Test(faults, an_idempotency_key_already_committed_applies_nothing_twice) {
  fx f;
  setup(&f, 2, "CREATE TABLE %s (n int NOT NULL); INSERT INTO %s VALUES (0); SELECT '%s'");
  cr_assert_eq(keel_tx_idempotency_install(f.ig, installed, &f), 0);
  wait_done(&f, 1);
  cr_assert_eq(f.statuses[0], 0, "%s", keel_integrity_last_error(f.ig));
  char key[64];
  kt_unique_name(key, sizeof key, "req");
  inc x = {&f, NULL};
  cr_assert_eq(
      keel_tx_run_idempotent(f.ig, KEEL_PG_READ_COMMITTED, NULL, key, inc_body, on_inc_done, &x),
      0);
  wait_done(&f, 2);
  cr_assert_eq(f.statuses[1], 0, "%s", keel_integrity_last_error(f.ig));
  /* The same request again (a client retry after a lost reply). */
  cr_assert_eq(
      keel_tx_run_idempotent(f.ig, KEEL_PG_READ_COMMITTED, NULL, key, inc_body, on_inc_done, &x),
      0);
  wait_done(&f, 3);
  cr_assert_eq(f.statuses[2], 0, "already committed is success: %s (%s)",
               keel_err_name(f.statuses[2]), keel_integrity_last_error(f.ig));
  /* A key of keel's own choosing. */
  cr_assert_eq(
      keel_tx_run_idempotent(f.ig, KEEL_PG_READ_COMMITTED, NULL, NULL, inc_body, on_inc_done, &x),
      0);
  wait_done(&f, 4);
  cr_assert_eq(f.statuses[3], 0);
  char *n = scalar(&f, "SELECT n FROM %s");
  cr_assert_str_eq(n, "2", "the repeated key applied nothing");
  free(n);
  keel_integrity_stats st;
  keel_integrity_get_stats(f.ig, &st);
  cr_assert_eq(st.already_committed, 1);
  cr_assert_eq(
      keel_tx_run_idempotent(f.ig, KEEL_PG_READ_COMMITTED, NULL, "", inc_body, on_inc_done, &x),
      UV_EINVAL);
  char sql[200];
  snprintf(sql, sizeof sql, "DELETE FROM keel_tx_idempotency WHERE key = '%s'", key);
  kt_pg_exec(sql);
  teardown(&f);
}

/* ---- #11: generated names of long and non-ASCII tables ---------------------- */

static void install_and_update(const char *table) {
  fx f;
  setup(&f, 2, NULL);
  snprintf(f.table, sizeof f.table, "%s", table);
  char sql[512];
  snprintf(sql, sizeof sql, "CREATE TABLE \"%s\" (id int PRIMARY KEY, name text)", table);
  kt_pg_exec(sql);
  snprintf(sql, sizeof sql, "INSERT INTO \"%s\" VALUES (1, 'a')", table);
  kt_pg_exec(sql);
  cr_assert_eq(keel_occ_install(f.ig, table, "version", KEEL_VERSION_INTEGER, installed, &f), 0,
               "%s", keel_integrity_last_error(f.ig));
  wait_done(&f, 1);
  cr_assert_eq(f.statuses[0], 0, "%s: %s", table, keel_integrity_last_error(f.ig));
  snprintf(sql, sizeof sql, "UPDATE \"%s\" SET name = 'b'", table);
  kt_pg_exec(sql);
  snprintf(sql, sizeof sql, "SELECT version FROM \"%s\"", table);
  char *v = kt_pg_scalar(sql);
  cr_assert_str_eq(v, "2", "the trigger bumps");
  free(v);
  teardown(&f);
}

Test(faults, installer_names_fit_63_bytes_and_never_split_a_character) {
  char name[160];
  /* 60 ASCII bytes. */
  char base[64];
  kt_unique_name(base, sizeof base, "n");
  snprintf(name, sizeof name, "%s_%s", base,
           "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
  name[60] = '\0';
  install_and_update(name);
  /* "ü" is two bytes: byte 24 falls inside one. */
  snprintf(name, sizeof name, "t%s", "üüüüüüüüüüüüüüüüüüüüüüüüüüüüü");
  for (int i = 0; i < 2; i++) {
    kt_unique_name(base, sizeof base, "");
    size_t len = strlen(name);
    snprintf(name + len, sizeof name - len, "%d", i);
  }
  name[61] = '\0';
  cr_assert_leq(strlen(name), 63);
  install_and_update(name);
  char out[64];
  cr_assert_eq(keel__ig_name(out, sizeof out, "keel_occ_bump_", "aüb", 2, 1), 0);
  cr_assert_str_eq(out, "keel_occ_bump_a_00000001", "cut before the two-byte character");
  cr_assert_eq(keel__utf8_prefix("a\xe2\x82\xac", 4, 3), 1);
  cr_assert_eq(keel__utf8_prefix("a\xe2\x82\xac", 4, 4), 4);
}

/* ---- issue 14: slugs without pipelining --------------------------------------- */

typedef struct slugs {
  fx *f;
  char slug[32][128];
} slugs;

static void on_slug(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)ig;
  slugs *s = data;
  int i = s->f->done++;
  s->f->statuses[i] = status;
  snprintf(s->slug[i], 128, "%s", slug ? slug : "");
}

typedef struct killer_ctx {
  fx *f;
  bool killed;
} killer_ctx;

static void kill_backend(uv_timer_t *t) {
  killer_ctx *k = t->data;
  fx *f = k->f;
  char sql[512];
  /* The session stuck in the slow INSERT is this test's own (by table). */
  snprintf(sql, sizeof sql,
           "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> "
           "pg_backend_pid() AND query LIKE 'INSERT INTO \"%s\"%%'",
           f->table);
  char *killed = kt_pg_scalar(sql);
  /* Not running yet (a loaded machine, a pooler in between): try again. */
  if (killed != NULL && strcmp(killed, "0") != 0) {
    uv_timer_stop(t);
    k->killed = true;
  }
  free(killed);
}

Test(faults, slug_session_lost_before_commit_is_retried_and_never_runs_alone) {
  for (int pipeline = 0; pipeline < 2; pipeline++) {
    fx f;
    setup_pool(
        &f, 2, pipeline != 0,
        "CREATE TABLE %s (id serial PRIMARY KEY, slug text UNIQUE NOT NULL); "
        "CREATE FUNCTION %s_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF (SELECT count(*) FROM pg_class WHERE relname = TG_TABLE_NAME || '_slow_once') = 0 "
        "THEN PERFORM pg_sleep(0.6); END IF; RETURN NEW; END $$; SELECT '%s'");
    char sql[512];
    snprintf(sql, sizeof sql,
             "CREATE TRIGGER slow BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION %s_slow()",
             f.table, f.table);
    kt_pg_exec(sql);
    warm_up(&f, 2);
    static slugs seen;
    memset(&seen, 0, sizeof seen);
    seen.f = &f;
    keel_slug_spec s = {.table = f.table, .slug_column = "slug", .name = "Jane Doe"};
    cr_assert_eq(keel_slug_insert(f.ig, &s, on_slug, &seen), 0);
    uv_timer_t killer;
    uv_timer_init(&f.loop, &killer);
    killer_ctx k = {&f, false};
    killer.data = &k;
    uv_timer_start(&killer, kill_backend, 200, 50);
    /* After the kill the next INSERT runs fast (marked only once the kill
     * happened: on a loaded machine the first INSERT can start late, and
     * must still be the one killed). */
    uint64_t start = uv_now(&f.loop);
    bool marked = false;
    while (f.done < 1 && uv_now(&f.loop) - start < 20000) {
      uv_run(&f.loop, UV_RUN_ONCE);
      if (!marked && k.killed) {
        snprintf(sql, sizeof sql, "CREATE TABLE %s_slow_once ()", f.table);
        kt_pg_exec(sql);
        marked = true;
      }
    }
    uv_close((uv_handle_t *)&killer, NULL);
    cr_assert_eq(f.done, 1);
    char *rows = scalar(&f, "SELECT count(*) FROM %s");
    if (f.statuses[0] == 0) {
      cr_assert_str_eq(seen.slug[0], "jane-doe");
      cr_assert_str_eq(rows, "1", "reported and inserted");
    } else {
      cr_assert_eq(f.statuses[0], KEEL_EINDOUBT, "%s", keel_err_name(f.statuses[0]));
    }
    free(rows);
    keel_integrity_stats st;
    keel_integrity_get_stats(f.ig, &st);
    cr_assert_geq(st.attempts, 2, "the killed attempt was retried");
    teardown(&f);
    snprintf(sql, sizeof sql, "DROP TABLE IF EXISTS %s_slow_once; DROP FUNCTION %s_slow()", f.table,
             f.table);
    kt_pg_exec(sql);
  }
}

/* ---- the callback contract ------------------------------------------------------ */

typedef struct closer {
  fx *f;
  int calls;
  int close_calls;
  bool closed;
} closer;

static void on_closed(void *ig, void *data) {
  (void)ig;
  closer *c = data;
  c->close_calls++;
}

static void close_in_occ(keel_integrity *ig, int status, const char *version, bool inserted,
                         void *data) {
  (void)status;
  (void)version;
  (void)inserted;
  closer *c = data;
  c->calls++;
  keel_integrity_close(ig, on_closed, c);
  cr_assert_eq(c->close_calls, 0, "never inside close");
  cr_assert_eq(keel_occ_update(ig, NULL, close_in_occ, c), KEEL_ECLOSING);
}

static void close_in_retry(keel_integrity *ig, int status, const char *version, unsigned attempts,
                           void *data) {
  (void)status;
  (void)version;
  (void)attempts;
  closer *c = data;
  c->calls++;
  keel_integrity_close(ig, on_closed, c);
  cr_assert_eq(c->close_calls, 0);
}

static void close_in_slug(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)status;
  (void)slug;
  closer *c = data;
  c->calls++;
  keel_integrity_close(ig, on_closed, c);
}

static void close_in_tx(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)status;
  (void)attempts;
  closer *c = data;
  c->calls++;
  keel_integrity_close(ig, on_closed, c);
}

static void close_in_install(keel_integrity *ig, int status, void *data) {
  (void)status;
  closer *c = data;
  c->calls++;
  keel_integrity_close(ig, on_closed, c);
}

static int plus_one(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                    void *data) {
  (void)values_out;
  (void)data;
  char buf[32];
  snprintf(buf, sizeof buf, "%ld", strtol(keel_pg_result_get(row, 0, "n"), NULL, 10) + 1);
  return keel_occ_set_value(ig, 0, buf);
}

static void tx_commit_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  (void)conn;
  (void)data;
  keel_pg_tx_finish(tx, 0);
}

Test(faults, close_from_inside_every_callback_and_calls_after_close) {
  for (int which = 0; which < 5; which++) {
    fx f;
    setup(&f, 2,
          "CREATE TABLE %s (id int PRIMARY KEY, slug text UNIQUE, n int NOT NULL DEFAULT 0, "
          "version bigint NOT NULL DEFAULT 1); INSERT INTO %s (id) VALUES (1); SELECT '%s'");
    closer c = {&f, 0, 0, false};
    const char *cols[] = {"n"};
    const char *vals[] = {"5"};
    keel_occ_spec s = {.table = f.table,
                       .key_column = "id",
                       .key_value = "1",
                       .version_column = "version",
                       .expected_version = "1",
                       .set_columns = cols,
                       .set_values = vals,
                       .set_count = 1};
    keel_slug_spec ss = {.table = f.table, .slug_column = "slug", .name = "x"};
    int rc = -1;
    switch (which) {
      case 0:
        rc = keel_occ_update(f.ig, &s, close_in_occ, &c);
        break;
      case 1:
        rc = keel_occ_retry(f.ig, &s, NULL, plus_one, close_in_retry, &c);
        break;
      case 2:
        rc = keel_slug_insert(f.ig, &ss, close_in_slug, &c);
        break;
      case 3:
        rc = keel_tx_run(f.ig, KEEL_PG_READ_COMMITTED, NULL, tx_commit_body, close_in_tx, &c);
        break;
      default:
        rc = keel_occ_install(f.ig, f.table, "version", KEEL_VERSION_INTEGER, close_in_install, &c);
        break;
    }
    cr_assert_eq(rc, 0, "%d: %s", which, keel_integrity_last_error(f.ig));
    uint64_t start = uv_now(&f.loop);
    while (c.close_calls == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
    cr_assert_eq(c.calls, 1, "%d: callback exactly once", which);
    cr_assert_eq(c.close_calls, 1, "%d: close callback once", which);
    keel_pg_pool_close(f.pool, NULL, NULL);
    kt_loop_finish(&f.loop);
    char sql[128];
    snprintf(sql, sizeof sql, "DROP TABLE %s", f.table);
    kt_pg_exec(sql);
  }
}

static int never_called(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                        void *data) {
  (void)ig;
  (void)row;
  (void)values_out;
  (void)data;
  return 0;
}

static void no_cb(keel_integrity *ig, int status, const char *version, bool inserted, void *data) {
  (void)ig;
  (void)status;
  (void)version;
  (void)inserted;
  (void)data;
  cr_assert_fail("not called");
}

Test(faults, after_close_every_call_is_eclosing_and_close_calls_back_later) {
  fx f;
  setup(&f, 1, NULL);
  closer c = {&f, 0, 0, false};
  keel_integrity *ig = f.ig;
  keel_integrity_close(ig, on_closed, &c);
  cr_assert_eq(c.close_calls, 0, "not inside close");
  const char *cols[] = {"n"};
  const char *vals[] = {"1"};
  keel_occ_spec s = {.table = "t",
                     .key_column = "id",
                     .key_value = "1",
                     .version_column = "version",
                     .expected_version = "1",
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  keel_slug_spec ss = {.table = "t", .slug_column = "slug", .name = "x"};
  cr_assert_eq(keel_occ_update(ig, &s, no_cb, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_occ_upsert(ig, &s, no_cb, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_occ_retry(ig, &s, NULL, never_called, close_in_retry, &c), KEEL_ECLOSING);
  cr_assert_eq(keel_slug_insert(ig, &ss, close_in_slug, &c), KEEL_ECLOSING);
  cr_assert_eq(keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, tx_commit_body, close_in_tx, &c),
               KEEL_ECLOSING);
  cr_assert_eq(keel_tx_run_idempotent(ig, KEEL_PG_READ_COMMITTED, NULL, "k", tx_commit_body,
                                      close_in_tx, &c),
               KEEL_ECLOSING);
  cr_assert_eq(keel_occ_install(ig, "t", "version", KEEL_VERSION_INTEGER, NULL, NULL),
               KEEL_ECLOSING);
  cr_assert_eq(keel_tx_idempotency_install(ig, NULL, NULL), KEEL_ECLOSING);
  keel_integrity_close(ig, on_closed, &c); /* second call: nothing */
  uv_run(&f.loop, UV_RUN_NOWAIT);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert_eq(c.close_calls, 1);
  keel_pg_pool_close(f.pool, NULL, NULL);
  kt_loop_finish(&f.loop);
}

/* ---- allocation failure on the main paths ------------------------------------- */

typedef struct oom {
  uv_loop_t loop;
  keel_pg_pool *pool;
  char table[64];
  int done;
  int expected;
  int which;
  int op; /* -1: every operation */
} oom;

static void oom_occ(keel_integrity *ig, int status, const char *version, bool inserted,
                    void *data) {
  (void)ig;
  (void)status;
  (void)version;
  (void)inserted;
  ((oom *)data)->done++;
  ((oom *)data)->which |= 1;
}

static void oom_retry(keel_integrity *ig, int status, const char *version, unsigned attempts,
                      void *data) {
  (void)ig;
  (void)status;
  (void)version;
  (void)attempts;
  ((oom *)data)->done++;
  ((oom *)data)->which |= 4;
}

static void oom_slug(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)ig;
  (void)status;
  (void)slug;
  ((oom *)data)->done++;
  ((oom *)data)->which |= 8;
}

static void oom_tx(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  (void)status;
  (void)attempts;
  ((oom *)data)->done++;
  ((oom *)data)->which |= 16;
}

static void oom_installed(keel_integrity *ig, int status, void *data) {
  (void)ig;
  (void)status;
  ((oom *)data)->done++;
  ((oom *)data)->which |= 64;
}

static int oom_closed;
static void oom_on_close(void *ig, void *data) {
  (void)ig;
  oom *o = data;
  cr_assert_eq(o->done, o->expected, "operations end before the close callback");
  oom_closed++;
}

static void oom_pool_closed(void *pool, void *data) {
  (void)pool;
  *(bool *)data = true;
}

static void oom_scenario(void *arg) {
  oom *o = arg;
  uv_loop_init(&o->loop);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 1;
  po.acquire_timeout_ms = 500; /* a pool that cannot connect fails its waiters */
  int rc = keel_pg_pool_new(&o->loop, &po, &o->pool);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM, "%s", keel_err_name(rc));
    kt_loop_finish(&o->loop);
    return;
  }
  keel_integrity *ig;
  rc = keel_integrity_new(&o->loop, o->pool, NULL, &ig);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    keel_pg_pool_close(o->pool, NULL, NULL);
    kt_loop_finish(&o->loop);
    return;
  }
  o->done = 0;
  o->expected = 0;
  o->which = 0;
  const char *cols[] = {"n"};
  const char *vals[] = {"7"};
  keel_occ_spec s = {.table = o->table,
                     .key_column = "id",
                     .key_value = "1",
                     .version_column = "version",
                     .expected_version = "1",
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  keel_slug_spec ss = {.table = o->table, .slug_column = "slug", .name = "Oom Test"};
  int rcs[7] = {1, 1, 1, 1, 1, 1, 1};
  for (int op = 0; op < 7; op++) {
    if (o->op >= 0 && op != o->op) continue;
    switch (op) {
      case 0:
        rcs[0] = keel_occ_update(ig, &s, oom_occ, o);
        break;
      case 1:
        rcs[1] = keel_occ_upsert(ig, &s, oom_occ, o);
        break;
      case 2:
        rcs[2] = keel_occ_retry(ig, &s, NULL, plus_one, oom_retry, o);
        break;
      case 3:
        rcs[3] = keel_slug_insert(ig, &ss, oom_slug, o);
        break;
      case 4:
        rcs[4] = keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, tx_commit_body, oom_tx, o);
        break;
      case 5:
        rcs[5] = keel_tx_run_idempotent(ig, KEEL_PG_READ_COMMITTED, NULL, NULL, tx_commit_body,
                                        oom_tx, o);
        break;
      default:
        rcs[6] = keel_occ_install(ig, o->table, "version", KEEL_VERSION_INTEGER, oom_installed, o);
        break;
    }
  }
  for (int i = 0; i < 7; i++) {
    if (rcs[i] == 1) continue;
    if (rcs[i] == 0)
      o->expected++;
    else
      cr_assert_eq(rcs[i], UV_ENOMEM, "call %d: %s", i, keel_err_name(rcs[i]));
  }
  uint64_t start = uv_now(&o->loop);
  while (o->done < o->expected && uv_now(&o->loop) - start < 3000) uv_run(&o->loop, UV_RUN_ONCE);
  if (kt_failmalloc_index() < 0)
    cr_assert_eq(o->done, o->expected, "the counting run completes: %x", o->which);
  /* Close with whatever is left: every accepted operation still calls back
   * exactly once (UV_ECANCELED at the latest), before the close callback. */
  int before = oom_closed;
  keel_integrity_close(ig, oom_on_close, o);
  bool pool_closed = false;
  keel_pg_pool_close(o->pool, oom_pool_closed, &pool_closed);
  while (!pool_closed || oom_closed == before) uv_run(&o->loop, UV_RUN_ONCE);
  cr_assert_eq(oom_closed, before + 1);
  cr_assert_eq(o->done, o->expected,
               "every accepted operation called back (run %lld%s; calls %d%d%d%d%d%d%d, seen %x)",
               (long long)kt_failmalloc_index(), kt_failmalloc_sticky() ? " sticky" : "", rcs[0],
               rcs[1], rcs[2], rcs[3], rcs[4], rcs[5], rcs[6], o->which);
  kt_loop_finish(&o->loop);
}

Test(faults, every_allocation_failure_on_the_main_paths_is_clean, .timeout = 600) {
  kt_alloc_install();
  static oom o;
  memset(&o, 0, sizeof o);
  kt_unique_name(o.table, sizeof o.table, "igoom");
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, slug text UNIQUE, n int NOT NULL DEFAULT 0, "
           "version bigint NOT NULL DEFAULT 1); INSERT INTO %s (id) VALUES (1); "
           "CREATE TABLE IF NOT EXISTS keel_tx_idempotency (key text PRIMARY KEY, "
           "committed_at timestamptz NOT NULL DEFAULT now())",
           o.table, o.table);
  kt_pg_exec(sql);
  for (o.op = 0; o.op < 7; o.op++) {
    kt_failmalloc_run(oom_scenario, &o);
    cr_assert_gt(kt_failmalloc_count(), 2);
    fprintf(stderr, "failmalloc: operation %d: %llu allocations, each failed once and from there\n",
            o.op, (unsigned long long)kt_failmalloc_count());
  }
  snprintf(sql, sizeof sql, "DROP TABLE %s", o.table);
  kt_pg_exec(sql);
}

/* ---- invalid input: every rejected argument, with a reason ------------------- */

static void noop_occ(keel_integrity *ig, int status, const char *version, bool inserted,
                     void *data) {
  (void)ig;
  (void)status;
  (void)version;
  (void)inserted;
  (void)data;
}

static void noop_retry(keel_integrity *ig, int status, const char *version, unsigned attempts,
                       void *data) {
  (void)ig;
  (void)status;
  (void)version;
  (void)attempts;
  (void)data;
}

static void noop_slug(keel_integrity *ig, int status, const char *slug, void *data) {
  (void)ig;
  (void)status;
  (void)slug;
  (void)data;
}

static void noop_tx(keel_integrity *ig, int status, unsigned attempts, void *data) {
  (void)ig;
  (void)status;
  (void)attempts;
  (void)data;
}

#define REJECTS(call)                                                                   \
  do {                                                                                  \
    cr_assert_eq((call), UV_EINVAL, "%s", #call);                                       \
    cr_assert_str_neq(keel_integrity_last_error(f.ig), "", "%s gives a reason", #call); \
  } while (0)

Test(faults, invalid_arguments_are_rejected_with_a_reason) {
  fx f;
  setup(&f, 1, NULL);
  keel_integrity *ig = f.ig;
  /* The context. */
  keel_integrity_opts o;
  keel_integrity *out = (keel_integrity *)&o;
  keel_integrity_opts_init(&o);
  cr_assert_eq(keel_integrity_new(NULL, f.pool, &o, &out), UV_EINVAL);
  cr_assert_eq(keel_integrity_new(&f.loop, NULL, &o, &out), UV_EINVAL);
  cr_assert_eq(keel_integrity_new(&f.loop, f.pool, &o, NULL), UV_EINVAL);
  o.retry.max_attempts = 0;
  cr_assert_eq(keel_integrity_new(&f.loop, f.pool, &o, &out), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.slug_max_attempts = 0;
  cr_assert_eq(keel_integrity_new(&f.loop, f.pool, &o, &out), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.retry.backoff.base_ms = 0;
  o.retry.backoff.factor = -1;
  cr_assert_eq(keel_integrity_new(&f.loop, f.pool, &o, &out), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.idempotency_table = "a.b.c";
  cr_assert_eq(keel_integrity_new(&f.loop, f.pool, &o, &out), UV_EINVAL);
  cr_assert_eq(out, (keel_integrity *)&o, "*out untouched on failure");
  keel_integrity_opts_init(NULL);
  keel_integrity_get_stats(NULL, NULL);
  keel_integrity_get_stats(ig, NULL);
  keel_integrity_close(NULL, NULL, NULL);
  cr_assert_str_neq(keel_integrity_last_error(NULL), "");
  cr_assert_str_eq(keel_integrity_last_sqlstate(NULL), "");

  /* Versioned updates. */
  const char *cols[] = {"a", "b"};
  const char *vals[] = {"1", "2"};
  const char *null_col[] = {NULL};
  const char *key_col[] = {"id"};
  const char *ver_col[] = {"version"};
  const char *dup[] = {"a", "a"};
  const char *bad_col[] = {"a\"b.c.d"};
  keel_occ_spec good = {.table = "t",
                        .key_column = "id",
                        .key_value = "1",
                        .version_column = "version",
                        .expected_version = "1",
                        .set_columns = cols,
                        .set_values = vals,
                        .set_count = 2};
  keel_occ_spec s;
  cr_assert_eq(keel_occ_update(NULL, &good, noop_occ, NULL), UV_EINVAL);
  REJECTS(keel_occ_update(ig, NULL, noop_occ, NULL));
  REJECTS(keel_occ_update(ig, &good, NULL, NULL));
  s = good, s.table = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.key_column = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.key_value = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.version_column = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.version_kind = (keel_version_kind)7;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.expected_version = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_count = -1;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_count = 61;
  REJECTS(keel_occ_upsert(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_values = NULL;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = null_col, s.set_count = 1;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = key_col, s.set_count = 1;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = ver_col, s.set_count = 1;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = dup;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.set_columns = bad_col, s.set_count = 1;
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.key_column = "a.b";
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.version_column = "a.b";
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.soft_delete_column = "a.b";
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.soft_delete_column = "id";
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));
  s = good, s.soft_delete_column = "version";
  REJECTS(keel_occ_update(ig, &s, noop_occ, NULL));

  /* The retry loop. */
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  ro.max_attempts = 0;
  cr_assert_eq(keel_occ_retry(NULL, &good, NULL, plus_one, noop_retry, NULL), UV_EINVAL);
  REJECTS(keel_occ_retry(ig, &good, NULL, NULL, noop_retry, NULL));
  REJECTS(keel_occ_retry(ig, &good, NULL, plus_one, NULL, NULL));
  REJECTS(keel_occ_retry(ig, &good, &ro, plus_one, noop_retry, NULL));
  keel_retry_opts_init(&ro);
  ro.backoff.factor = -3;
  ro.backoff.kind = KEEL_BACKOFF_EXPONENTIAL;
  REJECTS(keel_occ_retry(ig, &good, &ro, plus_one, noop_retry, NULL));
  s = good, s.table = NULL;
  REJECTS(keel_occ_retry(ig, &s, NULL, plus_one, noop_retry, NULL));
  cr_assert_eq(keel_occ_set_value(NULL, 0, "x"), UV_EINVAL);
  REJECTS(keel_occ_set_value(ig, 0, "x"));

  /* The installer. */
  cr_assert_eq(keel_occ_install(NULL, "t", "v", KEEL_VERSION_INTEGER, NULL, NULL), UV_EINVAL);
  REJECTS(keel_occ_install(ig, NULL, "v", KEEL_VERSION_INTEGER, NULL, NULL));
  REJECTS(keel_occ_install(ig, "t", NULL, KEEL_VERSION_INTEGER, NULL, NULL));
  REJECTS(keel_occ_install(ig, "a.b.c", "v", KEEL_VERSION_INTEGER, NULL, NULL));
  REJECTS(keel_occ_install(ig, "t", "a.b", KEEL_VERSION_INTEGER, NULL, NULL));
  REJECTS(keel_occ_install(ig, "t", "v", (keel_version_kind)9, NULL, NULL));

  /* Slugs. */
  const char *other[] = {"owner"};
  const char *other_vals[] = {"1"};
  const char *slug_col[] = {"slug"};
  keel_slug_spec sg = {.table = "t",
                       .slug_column = "slug",
                       .name = "x",
                       .columns = other,
                       .values = other_vals,
                       .count = 1};
  keel_slug_spec ss;
  cr_assert_eq(keel_slug_insert(NULL, &sg, noop_slug, NULL), UV_EINVAL);
  REJECTS(keel_slug_insert(ig, NULL, noop_slug, NULL));
  REJECTS(keel_slug_insert(ig, &sg, NULL, NULL));
  ss = sg, ss.table = NULL;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.slug_column = NULL;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.name = NULL;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.count = -1;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.count = 61;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.columns = NULL;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.values = NULL;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.max_len = 7;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.max_len = 101;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.table = "a.b.c";
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.slug_column = "a.b";
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.columns = slug_col;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));
  ss = sg, ss.columns = null_col;
  REJECTS(keel_slug_insert(ig, &ss, noop_slug, NULL));

  /* Transactions. */
  char long_key[260];
  memset(long_key, 'k', sizeof long_key - 1);
  long_key[sizeof long_key - 1] = '\0';
  keel_retry_opts_init(&ro);
  ro.max_attempts = 0;
  cr_assert_eq(keel_tx_run(NULL, KEEL_PG_READ_COMMITTED, NULL, tx_commit_body, noop_tx, NULL),
               UV_EINVAL);
  REJECTS(keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, NULL, noop_tx, NULL));
  REJECTS(keel_tx_run(ig, KEEL_PG_READ_COMMITTED, NULL, tx_commit_body, NULL, NULL));
  REJECTS(keel_tx_run(ig, (keel_pg_isolation)-1, NULL, tx_commit_body, noop_tx, NULL));
  REJECTS(keel_tx_run(ig, (keel_pg_isolation)3, NULL, tx_commit_body, noop_tx, NULL));
  REJECTS(keel_tx_run(ig, KEEL_PG_READ_COMMITTED, &ro, tx_commit_body, noop_tx, NULL));
  REJECTS(
      keel_tx_run_idempotent(ig, KEEL_PG_READ_COMMITTED, NULL, "", tx_commit_body, noop_tx, NULL));
  REJECTS(keel_tx_run_idempotent(ig, KEEL_PG_READ_COMMITTED, NULL, long_key, tx_commit_body,
                                 noop_tx, NULL));
  cr_assert_eq(keel_tx_idempotency_install(NULL, NULL, NULL), UV_EINVAL);

  /* Names. */
  char name[64];
  cr_assert_eq(keel__ig_name(name, 10, "p_", "x", 5, 1), UV_EINVAL, "cap must exceed 63");
  cr_assert_eq(
      keel__ig_name(name, sizeof name,
                    "a_prefix_far_too_long_for_any_identifier_at_all_more_than_55", "x", 5, 1),
      UV_EINVAL);
  keel_integrity_stats st;
  keel_integrity_get_stats(ig, &st);
  cr_assert_eq(st.operations, 0, "nothing rejected counts as an operation");
  teardown(&f);
}

/* A schema-qualified table: the function lives in the table's schema. */
Test(faults, installer_on_a_schema_qualified_table) {
  fx f;
  setup(&f, 2, NULL);
  char schema[64], table[160], sql[512];
  kt_unique_name(schema, sizeof schema, "sch");
  snprintf(sql, sizeof sql,
           "CREATE SCHEMA %s; CREATE TABLE %s.cards (id int PRIMARY KEY, name text); INSERT INTO "
           "%s.cards VALUES (1, 'a')",
           schema, schema, schema);
  kt_pg_exec(sql);
  snprintf(table, sizeof table, "%s.cards", schema);
  cr_assert_eq(keel_occ_install(f.ig, table, "version", KEEL_VERSION_UUID, installed, &f), 0);
  wait_done(&f, 1);
  cr_assert_eq(f.statuses[0], 0, "%s", keel_integrity_last_error(f.ig));
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE "
           "n.nspname = '%s' AND p.proname LIKE 'keel_occ_bump_cards_%%'",
           schema);
  char *n = kt_pg_scalar(sql);
  cr_assert_str_eq(n, "1");
  free(n);
  teardown(&f);
  snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE", schema);
  kt_pg_exec(sql);
}

/* ---- lost in flight, exactly: a proxy cuts right before a reply ------------ */

#include "../pg/pgproxy.h"

typedef struct cutfx {
  fx f;
  pgproxy *proxy;
  char via[512];
} cutfx;

static void setup_cut(cutfx *c) {
  memset(c, 0, sizeof *c);
  fx *f = &c->f;
  uv_loop_init(&f->loop);
  kt_unique_name(f->table, sizeof f->table, "igcut");
  char sql[512];
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (id int PRIMARY KEY, n int NOT NULL DEFAULT 0, slug text UNIQUE, "
           "version bigint NOT NULL DEFAULT 1); INSERT INTO %s (id) VALUES (1); "
           "CREATE TABLE IF NOT EXISTS keel_tx_idempotency (key text PRIMARY KEY, "
           "committed_at timestamptz NOT NULL DEFAULT now())",
           f->table, f->table);
  kt_pg_exec(sql);
  c->proxy = pgproxy_start(&f->loop, kt_pg_conninfo(), c->via, sizeof c->via);
  cr_assert_not_null(c->proxy);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = c->via;
  po.size = 1;
  cr_assert_eq(keel_pg_pool_new(&f->loop, &po, &f->pool), 0);
  cr_assert_eq(keel_integrity_new(&f->loop, f->pool, NULL, &f->ig), 0);
  warm_up(f, 1);
}

static void teardown_cut(cutfx *c) {
  pgproxy_stop(c->proxy);
  teardown(&c->f);
}

static void inc_tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  inc *x = data;
  x->tx = tx;
  char sql[256];
  snprintf(sql, sizeof sql, "UPDATE %s SET n = n + 1 WHERE id = 1", x->f->table);
  if (keel_pg_query(conn, sql, 0, NULL, after_inc, x) != 0) keel_pg_tx_finish(tx, UV_ENOMEM);
}

Test(faults, a_commit_lost_in_flight_is_looked_up_not_retried_blindly) {
  for (int variant = 0; variant < 3; variant++) {
    cutfx c;
    setup_cut(&c);
    fx *f = &c.f;
    inc x = {f, NULL};
    /* The server commits; the client never hears of it. */
    pgproxy_cut_at(c.proxy, "COMMIT", false);
    int rc;
    if (variant == 0) {
      rc = keel_tx_run(f->ig, KEEL_PG_READ_COMMITTED, NULL, inc_tx_body, on_inc_done, &x);
    } else if (variant == 1) {
      rc = keel_tx_run_idempotent(f->ig, KEEL_PG_READ_COMMITTED, NULL, NULL, inc_tx_body,
                                  on_inc_done, &x);
    } else {
      const char *cols[] = {"n"};
      keel_occ_spec s = {.table = f->table,
                         .key_column = "id",
                         .key_value = "1",
                         .version_column = "version",
                         .set_columns = cols,
                         .set_count = 1};
      rc = keel_occ_retry(f->ig, &s, NULL, plus_one, on_retried, f);
    }
    cr_assert_eq(rc, 0);
    wait_done(f, 1);
    cr_assert_eq(pgproxy_cuts(c.proxy), 1, "the COMMIT's reply was cut");
    cr_assert_eq(f->statuses[0], 0, "variant %d: committed, found out: %s (%s)", variant,
                 keel_err_name(f->statuses[0]), keel_integrity_last_error(f->ig));
    cr_assert_eq(f->attempts[0], 1, "not run again");
    char *n = scalar(f, "SELECT n FROM %s");
    cr_assert_str_eq(n, "1", "applied exactly once");
    free(n);
    keel_integrity_stats st;
    keel_integrity_get_stats(f->ig, &st);
    cr_assert_eq(st.in_doubt_resolved, 1);
    cr_assert_eq(st.in_doubt, 0);
    teardown_cut(&c);
  }
}

/* A versioned update that wrote nothing reads the row to tell a conflict
 * from a missing row; when that read is lost, the update still certainly
 * did not take effect: KEEL_ECONN (safe to retry), never KEEL_EINDOUBT. */
Test(faults, a_conflict_whose_read_is_lost_is_certain_not_in_doubt) {
  cutfx c;
  setup_cut(&c);
  fx *f = &c.f;
  const char *cols[] = {"n"};
  const char *vals[] = {"5"};
  keel_occ_spec s = {.table = f->table,
                     .key_column = "id",
                     .key_value = "1",
                     .version_column = "version",
                     .expected_version = "7", /* the row has version 1 */
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  pgproxy_cut_at(c.proxy, "SELECT", false);
  cr_assert_eq(keel_occ_update(f->ig, &s, on_occ, f), 0);
  wait_done(f, 1);
  cr_assert_eq(pgproxy_cuts(c.proxy), 1, "the read's reply was cut");
  cr_assert_eq(f->statuses[0], KEEL_ECONN, "%s: %s", keel_err_name(f->statuses[0]),
               keel_integrity_last_error(f->ig));
  keel_integrity_stats st;
  keel_integrity_get_stats(f->ig, &st);
  cr_assert_eq(st.in_doubt, 0);
  char *row = scalar(f, "SELECT n || '/' || version FROM %s WHERE id = 1");
  cr_assert_str_eq(row, "0/1", "nothing written");
  free(row);
  /* The same call again (the connection is back) reports the conflict. */
  warm_up(f, 1);
  cr_assert_eq(keel_occ_update(f->ig, &s, on_occ, f), 0);
  wait_done(f, 2);
  cr_assert_eq(f->statuses[1], KEEL_ECONFLICT);
  teardown_cut(&c);
}

Test(faults, single_statements_lost_in_flight_are_reported_in_doubt) {
  cutfx c;
  setup_cut(&c);
  fx *f = &c.f;
  /* A versioned update's reply (tag UPDATE: a plain UPDATE ... RETURNING). */
  const char *cols[] = {"n"};
  const char *vals[] = {"5"};
  keel_occ_spec s = {.table = f->table,
                     .key_column = "id",
                     .key_value = "1",
                     .version_column = "version",
                     .expected_version = "1",
                     .set_columns = cols,
                     .set_values = vals,
                     .set_count = 1};
  pgproxy_cut_at(c.proxy, "UPDATE", false);
  cr_assert_eq(keel_occ_update(f->ig, &s, on_occ, f), 0);
  wait_done(f, 1);
  cr_assert_eq(f->statuses[0], KEEL_EINDOUBT, "%s: %s", keel_err_name(f->statuses[0]),
               keel_integrity_last_error(f->ig));
  warm_up(f, 1);
  /* A slug whose COMMIT reply is lost. */
  static slugs seen;
  memset(&seen, 0, sizeof seen);
  seen.f = f;
  const char *id_col[] = {"id"};
  const char *id_val[] = {"2"};
  keel_slug_spec ss = {.table = f->table,
                       .slug_column = "slug",
                       .name = "Lost Reply",
                       .columns = id_col,
                       .values = id_val,
                       .count = 1};
  pgproxy_cut_at(c.proxy, "COMMIT", false);
  cr_assert_eq(keel_slug_insert(f->ig, &ss, on_slug, &seen), 0);
  wait_done(f, 2);
  cr_assert_eq(f->statuses[1], KEEL_EINDOUBT, "%s: %s", keel_err_name(f->statuses[1]),
               keel_integrity_last_error(f->ig));
  keel_integrity_stats st;
  keel_integrity_get_stats(f->ig, &st);
  cr_assert_eq(st.in_doubt, 2);
  teardown_cut(&c);
}
