/* A full restart of a private PostgreSQL server mid-stream: the listener
 * reconnects with backoff, LISTENs again, reports the gap, and later changes
 * reach the handler. The server is started here (initdb in a temporary
 * directory, as scripts/lib.sh does), never the shared test server. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/listen.h"
#include "support/harness.h"

typedef struct state {
  int count;
  char names[16][32];
  int gaps;
  uint64_t gap_ms;
} state;

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  state *s = data;
  const char *name = keel_change_new(c, "name");
  if (s->count < 16) snprintf(s->names[s->count], 32, "%s", name ? name : "(null)");
  s->count++;
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)l;
  state *s = data;
  s->gaps++;
  s->gap_ms = ms;
}

static void run_until(uv_loop_t *loop, const int *value, int want) {
  uint64_t start = uv_now(loop);
  while (*value < want && uv_now(loop) - start < 20000) uv_run(loop, UV_RUN_ONCE);
  cr_assert_geq(*value, want, "waited for %d, got %d", want, *value);
}

Test(listen_restart, full_server_restart_mid_stream, .timeout = 90) {
  kt_private_pg p;
  kt_private_pg_init(&p, NULL);
  kt_private_pg_ctl(&p, "start", "fast");
  char sqlbuf[8192];
  kt_private_pg_exec(&p, "CREATE TABLE items (id serial PRIMARY KEY, name text)");
  int n = keel_listener_install_sql(sqlbuf, sizeof sqlbuf, "items", "id", "items_changes");
  cr_assert_gt(n, 0);
  kt_private_pg_exec(&p, sqlbuf);

  uv_loop_t loop;
  uv_loop_init(&loop);
  state s = {0};
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = p.conninfo;
  o.table = "public.items";
  o.channel = "items_changes";
  o.heartbeat_ms = 500;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 100);
  o.on_gap = on_gap;
  o.data = &s;
  keel_listener *l;
  cr_assert_eq(keel_listener_new(&loop, &o, &l), 0);
  cr_assert_eq(keel_listener_on(l, "h", handler, &s), 0);
  cr_assert_eq(keel_listener_start(l), 0);
  uint64_t start = uv_now(&loop);
  while (!keel_listener_is_active(l) && uv_now(&loop) - start < 10000) uv_run(&loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(l));

  kt_private_pg_exec(&p, "INSERT INTO items (name) VALUES ('before')");
  run_until(&loop, &s.count, 1);
  cr_assert_str_eq(s.names[0], "before");

  kt_private_pg_ctl(&p, "restart", "fast"); /* the loop is not running: the old socket is dead */
  run_until(&loop, &s.gaps, 1);
  cr_assert(keel_listener_is_active(l));
  cr_assert_eq(s.gaps, 1);

  kt_private_pg_exec(&p, "INSERT INTO items (name) VALUES ('after')");
  run_until(&loop, &s.count, 2);
  cr_assert_str_eq(s.names[1], "after");
  keel_listener_stats st;
  keel_listener_get_stats(l, &st);
  cr_assert_geq(st.reconnects, 1);
  cr_assert_eq(st.gaps, 1);
  cr_assert_eq(st.delivered, 2);

  keel_listener_close(l, NULL, NULL);
  kt_loop_finish(&loop);
  kt_private_pg_destroy(&p);
}
