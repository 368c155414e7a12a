/* Allocation failure as an input for the idempotency stores: every
 * allocation of a begin / complete / close scenario fails in turn (its own
 * process: the runs are long). */
#include "scenarios.h"

static void store_open(fx *f) {
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 1;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&f->loop, &po, &pool), 0);
  f->client = pool;
  f->opts.table = f->scope;
  cr_assert_eq(keel_idem_new_pg(&f->loop, pool, &f->opts, &f->idem), 0);
  f->errors = 0;
  cr_assert_eq(keel_idem_install(f->idem, on_done, f), 0);
  wait_n(f, 1);
  cr_assert_eq(f->errors, 0, "install: %s", keel_idem_last_error(f->idem));
}

static void store_close(fx *f) {
  keel_idem_close(f->idem, NULL, NULL);
  keel_pg_pool_close(f->client, NULL, NULL);
  f->idem = NULL;
}

static void drop(fx *f) {
  kt_pg_execf("DROP TABLE IF EXISTS %s", f->scope);
}

/* ---- allocation failure ------------------------------------------------ */

static char failmalloc_table[64];

static void failmalloc_scenario(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 1;
  po.acquire_timeout_ms = 500;
  keel_pg_pool *pool = NULL;
  keel_idem *idem = NULL;
  fx f;
  memset(&f, 0, sizeof f);
  snprintf(f.scope, sizeof f.scope, "%s", failmalloc_table);
  keel_idem_opts o;
  keel_idem_opts_init(&o);
  o.table = failmalloc_table;
  if (keel_pg_pool_new(&loop, &po, &pool) == 0 && keel_idem_new_pg(&loop, pool, &o, &idem) == 0) {
    char key[32];
    snprintf(key, sizeof key, "fm%lld%d", (long long)kt_failmalloc_index(),
             (int)kt_failmalloc_sticky());
    int n = 0;
    if (keel_idem_begin(idem, f.scope, key, "fp", on_begin, &f) == 0) n++;
    if (keel_idem_begin(idem, f.scope, key, "fp", on_begin, &f) == 0) n++;
    while (f.done < n) uv_run(&loop, UV_RUN_ONCE);
    cr_assert_leq(f.owners, 1);
    if (f.owners == 1) {
      int m = f.done;
      if (keel_idem_complete(idem, f.scope, key, &f.token, 200, "body", 4, on_done, &f) == 0) {
        while (f.done == m) uv_run(&loop, UV_RUN_ONCE);
      }
    }
    keel_idem_close(idem, NULL, NULL);
  }
  keel_pg_pool_close(pool, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(idem_failmalloc, pg_failure_is_an_input, .timeout = 600) {
  fx f;
  fx_init(&f);
  store_open(&f);
  store_close(&f);
  kt_loop_finish(&f.loop);
  snprintf(failmalloc_table, sizeof failmalloc_table, "%s", f.scope);
  kt_failmalloc_run(failmalloc_scenario, NULL);
  cr_assert_gt(kt_failmalloc_count(), 0);
  drop(&f);
}

/* The same on the Redis store. */
static char redis_url[128];

static void failmalloc_redis(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = redis_url;
  ro.command_timeout_ms = 500;
  keel_redis *r = NULL;
  keel_idem *idem = NULL;
  fx f;
  memset(&f, 0, sizeof f);
  snprintf(f.scope, sizeof f.scope, "%s", failmalloc_table);
  if (keel_redis_new(&loop, &ro, &r) == 0 && keel_idem_new_redis(&loop, r, NULL, &idem) == 0) {
    char key[32];
    snprintf(key, sizeof key, "fm%lld%d", (long long)kt_failmalloc_index(),
             (int)kt_failmalloc_sticky());
    int n = 0;
    if (keel_idem_begin(idem, f.scope, key, "fp", on_begin, &f) == 0) n++;
    if (keel_idem_begin(idem, f.scope, key, "fp", on_begin, &f) == 0) n++;
    while (f.done < n) uv_run(&loop, UV_RUN_ONCE);
    cr_assert_leq(f.owners, 1);
    if (f.owners == 1) {
      int m = f.done;
      if (keel_idem_complete(idem, f.scope, key, &f.token, 200, "body", 4, on_done, &f) == 0) {
        while (f.done == m) uv_run(&loop, UV_RUN_ONCE);
      }
    }
    keel_idem_close(idem, NULL, NULL);
  }
  keel_redis_close(r, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(idem_failmalloc, redis, .timeout = 600) {
  kt_redis_url(redis_url, sizeof redis_url);
  kt_unique_name(failmalloc_table, sizeof failmalloc_table, "fmr");
  kt_failmalloc_run(failmalloc_redis, NULL);
  cr_assert_gt(kt_failmalloc_count(), 0);
}
