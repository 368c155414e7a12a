/*
 * examples/cards.c — the seeds' business-card flow in C.
 *
 * 1. Three people create a card named "Jane Doe" at the same time: each gets
 *    a unique slug (jane-doe, jane-doe-2, jane-doe-3), atomically.
 * 2. Two editors update the first card with the version they read (1): one
 *    wins (version 2), the other gets KEEL_ECONFLICT with the current
 *    version — the seed's 409 with currentVersion.
 * 3. The loser retries with keel_occ_retry: read, mutate, versioned update.
 *
 * Run: KEEL_PG="host=... dbname=..." ./cards   (exits 0 when all went as
 * described)
 */
#include <keel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct app {
  uv_loop_t *loop;
  keel_pg_pool *pool;
  keel_integrity *ig;
  int created;
  int updates_done, conflicts, successes;
  bool retried_ok;
  int failures;
} app;

static void finish(app *a) {
  keel_integrity_close(a->ig, NULL, NULL);
  keel_pg_pool_close(a->pool, NULL, NULL);
}

static void after_retry(keel_integrity *ig, int status, const char *version, unsigned attempts,
                        void *data) {
  (void)ig;
  app *a = data;
  printf("retry: %s, version %s after %u attempt(s)\n", keel_strerror(status),
         version ? version : "-", attempts);
  a->retried_ok = status == 0;
  finish(a);
}

/* The retry's mutation: append to whatever name is current now. */
static int append_title(keel_integrity *ig, const keel_pg_result *row, const char **values_out,
                        void *data) {
  (void)ig;
  static char name[128];
  (void)data;
  snprintf(name, sizeof name, "%s, PhD", keel_pg_result_get(row, 0, "name"));
  values_out[0] = name;
  return 0;
}

static void after_update(keel_integrity *ig, int status, const char *version, bool inserted,
                         void *data) {
  (void)inserted;
  app *a = data;
  if (status == 0) {
    printf("update: saved, new version %s\n", version);
    a->successes++;
  } else if (status == KEEL_ECONFLICT) {
    printf("update: 409 version conflict, current version is %s\n", version);
    a->conflicts++;
  } else {
    fprintf(stderr, "update failed: %s\n", keel_integrity_last_error(ig));
    a->failures++;
  }
  if (++a->updates_done < 2) return;
  /* The loser retries: read the row again, re-apply its change, save. */
  const char *cols[] = {"name"};
  keel_occ_spec spec = {.table = "keel_demo_cards",
                        .key_column = "slug",
                        .key_value = "jane-doe",
                        .version_column = "version",
                        .set_columns = cols,
                        .set_count = 1};
  if (keel_occ_retry(ig, &spec, NULL, append_title, after_retry, a) != 0) finish(a);
}

static void edit_first_card(app *a) {
  /* Both editors read version 1 and save at the same time. */
  static const char *const cols[] = {"name"};
  static const char *const first[] = {"Jane Doe (editor A)"};
  static const char *const second[] = {"Jane Doe (editor B)"};
  keel_occ_spec spec = {.table = "keel_demo_cards",
                        .key_column = "slug",
                        .key_value = "jane-doe",
                        .version_column = "version",
                        .expected_version = "1",
                        .set_columns = cols,
                        .set_count = 1};
  spec.set_values = first;
  keel_occ_update(a->ig, &spec, after_update, a);
  spec.set_values = second;
  keel_occ_update(a->ig, &spec, after_update, a);
}

static void after_create(keel_integrity *ig, int status, const char *slug, void *data) {
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "create failed: %s\n", keel_integrity_last_error(ig));
    a->failures++;
  } else {
    printf("created card with slug %s\n", slug);
  }
  if (++a->created == 3) edit_first_card(a);
}

static void after_setup(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  app *a = data;
  if (status != 0) {
    fprintf(stderr, "setup failed: %s\n", keel_pg_last_error(conn));
    a->failures++;
    finish(a);
    return;
  }
  const char *cols[] = {"name"};
  const char *vals[] = {"Jane Doe"};
  keel_slug_spec spec = {.table = "keel_demo_cards",
                         .slug_column = "slug",
                         .name = "Jane Doe",
                         .columns = cols,
                         .values = vals,
                         .count = 1};
  for (int i = 0; i < 3; i++) keel_slug_insert(a->ig, &spec, after_create, a);
}

static void after_drop(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  (void)status;
  (void)res;
  app *a = data;
  keel_pg_pool_query(a->pool,
                     "CREATE TABLE keel_demo_cards (id serial PRIMARY KEY, slug text UNIQUE NOT "
                     "NULL, name text, version bigint NOT NULL DEFAULT 1)",
                     0, NULL, after_setup, a);
}

int main(void) {
  const char *conninfo = getenv("KEEL_PG");
  if (conninfo == NULL || conninfo[0] == '\0') conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL) {
    fprintf(stderr, "set KEEL_PG to a PostgreSQL connection string\n");
    return 1;
  }
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = conninfo;
  po.size = 3;
  if (keel_pg_pool_new(a.loop, &po, &a.pool) != 0) return 1;
  if (keel_integrity_new(a.loop, a.pool, NULL, &a.ig) != 0) return 1;

  /* Pool statements may run on different connections at once: chain the
   * set-up through callbacks. */
  keel_pg_pool_query(a.pool, "DROP TABLE IF EXISTS keel_demo_cards", 0, NULL, after_drop, &a);
  uv_run(a.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(a.loop) != 0) return 1;
  bool ok =
      a.failures == 0 && a.created == 3 && a.successes == 1 && a.conflicts == 1 && a.retried_ok;
  printf("%s\n", ok ? "all as expected" : "unexpected outcome");
  return ok ? 0 : 1;
}
