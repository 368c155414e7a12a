/* Idempotency keys in Redis against the real server of scripts/test: the
 * shared scenarios (100 concurrent begins, mismatch, abort, large bodies,
 * TTL, a killed owner) and the script cache flushed mid-run. */
#include "../redis/redis_server.h"
#include "scenarios.h"

static void store_open(fx *f) {
  char url[128];
  kt_redis_url(url, sizeof url);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = url;
  keel_redis *r;
  cr_assert_eq(keel_redis_new(&f->loop, &ro, &r), 0);
  f->client = r;
  cr_assert_eq(keel_idem_new_redis(&f->loop, r, &f->opts, &f->idem), 0);
  f->errors = 0;
  cr_assert_eq(keel_idem_install(f->idem, on_done, f), 0);
  wait_n(f, 1);
  cr_assert_eq(f->errors, 0);
}

static void store_close(fx *f) {
  keel_idem_close(f->idem, NULL, NULL);
  keel_redis_close(f->client, NULL, NULL);
  f->idem = NULL;
}

Test(idem_redis, concurrent_begins_one_owner_then_stored_response) {
  fx f;
  fx_init(&f);
  store_open(&f);
  scenario_concurrent(&f);
  fx_finish(&f);
}

Test(idem_redis, abort_large_body_and_bad_input) {
  fx f;
  fx_init(&f);
  f.opts.max_body = 100;
  store_open(&f);
  scenario_abort_and_large(&f);
  fx_finish(&f);
}

Test(idem_redis, complete_after_processing_ttl_is_lost) {
  fx f;
  fx_init(&f);
  f.opts.processing_ttl_ms = 300;
  store_open(&f);
  scenario_ttl(&f);
  fx_finish(&f);
}

Test(idem_redis, owner_killed_busy_until_ttl_then_one_reexecution, .timeout = 120) {
  fx f;
  fx_init(&f);
  scenario_owner_killed(&f, 2000);
  fx_finish(&f);
}

/* On an own server: SCRIPT FLUSH between calls (NOSCRIPT fallback), and a
 * stopped server gives an error to every begin, never a crash or a lost
 * callback; after the restart the store works again. */
Test(idem_redis, script_flush_and_server_stop, .timeout = 120) {
  kt_redis_server srv;
  kt_redis_server_start(&srv);
  fx f;
  fx_init(&f);
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = srv.url;
  ro.command_timeout_ms = 500;
  keel_redis *r;
  cr_assert_eq(keel_redis_new(&f.loop, &ro, &r), 0);
  f.client = r;
  cr_assert_eq(keel_idem_new_redis(&f.loop, r, &f.opts, &f.idem), 0);
  begins(&f, 1, "a", "fp");
  cr_assert_eq(f.owners, 1);
  kt_redis_server_cmd(&srv, "SCRIPT FLUSH");
  cr_assert_eq(complete(&f, "a", &f.token, 200, "ok", 2), 0);
  kt_redis_server_stop(&srv);
  reset_counts(&f);
  for (int i = 0; i < 10; i++)
    cr_assert_eq(keel_idem_begin(f.idem, f.scope, "b", "fp", on_begin, &f), 0);
  wait_n(&f, 10);
  cr_assert_eq(f.errors, 10);
  kt_redis_server_restart(&srv);
  /* The data went with the server (no persistence): b is new again. */
  bool ok = false;
  for (int i = 0; i < 100 && !ok; i++) {
    reset_counts(&f);
    cr_assert_eq(keel_idem_begin(f.idem, f.scope, "b", "fp", on_begin, &f), 0);
    wait_n(&f, 1);
    ok = f.owners == 1;
    if (!ok) uv_sleep(50);
  }
  cr_assert(ok, "works again after the restart");
  keel_idem_stats st;
  keel_idem_get_stats(f.idem, &st);
  cr_assert_geq(st.errors, 10);
  fx_finish(&f);
  kt_redis_server_destroy(&srv);
}
