/* The listener's self-probe (issue 20): a NOTIFY on its own channel, sent
 * by another session, must come back within probe_timeout_ms. Directly
 * against PostgreSQL it does (the listener stays active and reports the
 * round trip's lag); through PgBouncer in transaction mode
 * (KEEL_TEST_PG_POOLER) it does not, and the listener says so with
 * KEEL_ENOTHEARING and is not active. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../pg/pgproxy.h"
#include "keel/listen.h"
#include "support/harness.h"

typedef struct pfx {
  uv_loop_t loop;
  keel_listener *l;
  int errors;
  int not_hearing;
  int last_err;
  bool active_after_miss; /* active seen after the first miss */
  bool closed;
} pfx;

static void on_error(keel_listener *l, int err, const char *message, void *data) {
  (void)l;
  (void)message;
  pfx *f = data;
  f->errors++;
  f->last_err = err;
  if (err == KEEL_ENOTHEARING) f->not_hearing++;
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((pfx *)data)->closed = true;
}

static bool is_closed(void *ctx) {
  return ((pfx *)ctx)->closed;
}

static void pfx_start(pfx *f, const char *conninfo, uint32_t interval_ms, uint32_t timeout_ms) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  cr_expect_eq(o.probe_interval_ms, 5000);
  cr_expect_eq(o.probe_timeout_ms, 5000);
  o.conninfo = conninfo;
  o.on_error = on_error;
  o.data = f;
  o.probe_interval_ms = interval_ms;
  o.probe_timeout_ms = timeout_ms;
  cr_assert_eq(keel_listener_new(&f->loop, &o, &f->l), 0);
  cr_assert_eq(keel_listener_start(f->l), 0);
}

static void pfx_finish(pfx *f) {
  keel_listener_close(f->l, on_closed, f);
  cr_expect(kt_wait_for(&f->loop, is_closed, f, 5000));
  kt_loop_finish(&f->loop);
}

static bool three_probes_back(void *ctx) {
  pfx *f = ctx;
  keel_listener_stats st;
  keel_listener_get_stats(f->l, &st);
  return st.probes_received >= 3;
}

Test(listen_probe, direct_stays_active_and_reports_lag) {
  pfx f;
  pfx_start(&f, kt_pg_direct_conninfo(), 100, 3000);
  cr_assert(kt_wait_for(&f.loop, three_probes_back, &f, 15000), "probes did not come back: %s",
            keel_listener_last_error(f.l));
  keel_listener_stats st;
  keel_listener_get_stats(f.l, &st);
  cr_expect(keel_listener_is_active(f.l));
  cr_expect(st.active);
  cr_expect(st.hearing);
  cr_expect_eq(st.probes_missed, 0);
  cr_expect_eq(f.not_hearing, 0, "%s", keel_listener_last_error(f.l));
  /* a probe may come back before its sender's own reply is read */
  cr_expect_geq(st.probes_sent + 1, st.probes_received);
  cr_expect_gt(st.probe_lag_last_us, 0.0);
  cr_expect_gt(st.probe_lag_p50_us, 0.0);
  cr_expect_geq(st.probe_lag_p99_us, st.probe_lag_p50_us);
  /* probes are not changes: nothing counted as received or malformed */
  cr_expect_eq(st.received, 0);
  cr_expect_eq(st.malformed, 0);
  /* the probe's session is told from the listener's */
  char *n = kt_pg_scalarf(
      "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
      "'%%/probe' AND pid <> pg_backend_pid()");
  cr_expect_neq(atoi(n), 0);
  free(n);
  pfx_finish(&f);
}

static bool said_not_hearing(void *ctx) {
  return ((pfx *)ctx)->not_hearing > 0;
}

Test(listen_probe, pooler_reports_not_hearing) {
  pfx f;
  pfx_start(&f, kt_pg_pooler_conninfo(), 200, 1000);
  /* the bound: connect, LISTEN, the first probe, then probe_timeout_ms */
  cr_assert(kt_wait_for(&f.loop, said_not_hearing, &f, 15000),
            "a listener behind a transaction pooler did not say it is deaf (errors %d, last %s: "
            "%s)",
            f.errors, keel_err_name(f.last_err), keel_listener_last_error(f.l));
  cr_expect_not(keel_listener_is_active(f.l));
  keel_listener_stats st;
  keel_listener_get_stats(f.l, &st);
  cr_expect_geq(st.probes_missed, 1);
  cr_expect_not(st.hearing);
  cr_expect_not(st.active);
  cr_expect(strstr(keel_listener_last_error(f.l), "not hearing") != NULL ||
                strstr(keel_listener_last_error(f.l), "connection") != NULL,
            "%s", keel_listener_last_error(f.l));
  /* it keeps trying (LISTEN again, reconnect) and stays inactive: never
   * active again without a probe back */
  uint64_t until = uv_now(&f.loop) + 3000;
  bool active = false;
  while (uv_now(&f.loop) < until) {
    uv_run(&f.loop, UV_RUN_ONCE);
    if (keel_listener_is_active(f.l)) active = true;
  }
  cr_expect_not(active, "active again without hearing its probe");
  keel_listener_get_stats(f.l, &st);
  cr_expect_geq(f.not_hearing, 2, "it stopped trying");
  pfx_finish(&f);
}

Test(listen_probe, no_probe_opens_no_second_session) {
  pfx f;
  memset(&f, 0, sizeof f);
  cr_assert_eq(uv_loop_init(&f.loop), 0);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  char conninfo[512];
  char app[64];
  kt_unique_name(app, sizeof app, "noprobe");
  snprintf(conninfo, sizeof conninfo, "%s application_name=%s", kt_pg_direct_conninfo(), app);
  o.conninfo = conninfo;
  o.no_probe = true;
  o.on_error = on_error;
  o.data = &f;
  cr_assert_eq(keel_listener_new(&f.loop, &o, &f.l), 0);
  cr_assert_eq(keel_listener_start(f.l), 0);
  uint64_t until = uv_now(&f.loop) + 5000;
  while (!keel_listener_is_active(f.l) && uv_now(&f.loop) < until) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(f.l));
  char *n = kt_pg_scalarf(
      "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%s%%'", app);
  cr_expect_str_eq(n, "1");
  free(n);
  keel_listener_stats st;
  keel_listener_get_stats(f.l, &st);
  cr_expect_eq(st.probes_sent, 0);
  pfx_finish(&f);
}

/* ---- a proxy that drops notifications: deaf, then heard again ------------------- */

static int gaps;

static void count_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)l, (void)ms, (void)data;
  gaps++;
}

static bool one_probe_back(void *ctx) {
  pfx *f = ctx;
  keel_listener_stats st;
  keel_listener_get_stats(f->l, &st);
  return st.probes_received >= 1 && keel_listener_is_active(f->l);
}

static bool hearing_again(void *ctx) {
  pfx *f = ctx;
  keel_listener_stats st;
  keel_listener_get_stats(f->l, &st);
  return st.hearing && keel_listener_is_active(f->l);
}

/* A fixture whose listener goes through a test proxy; *o is set up for it
 * (errors and gaps counted, reconnects after 50 ms) for the caller to
 * adjust before keel_listener_new(). via holds the proxy's conninfo. */
static pgproxy *proxied_start(pfx *f, keel_listener_opts *o, char *via, size_t via_cap) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  pgproxy *proxy = pgproxy_start(&f->loop, kt_pg_direct_conninfo(), via, via_cap);
  keel_listener_opts_init(o);
  o->conninfo = via;
  o->on_error = on_error;
  o->on_gap = count_gap;
  o->data = f;
  keel_backoff_fixed(&o->reconnect_backoff, 50);
  gaps = 0;
  return proxy;
}

Test(listen_probe, dropped_notifications_deaf_then_recovers) {
  pfx f;
  keel_listener_opts o;
  char via[512];
  pgproxy *proxy = proxied_start(&f, &o, via, sizeof via);
  o.probe_interval_ms = 100;
  o.probe_timeout_ms = 800;
  cr_assert_eq(keel_listener_new(&f.loop, &o, &f.l), 0);
  cr_assert_eq(keel_listener_start(f.l), 0);
  cr_assert(kt_wait_for(&f.loop, one_probe_back, &f, 10000), "%s", keel_listener_last_error(f.l));
  cr_expect_eq(f.not_hearing, 0);

  /* the proxy loses every notification from now on */
  pgproxy_drop_notifications(proxy, true);
  cr_assert(kt_wait_for(&f.loop, said_not_hearing, &f, 10000), "no KEEL_ENOTHEARING: %s",
            keel_listener_last_error(f.l));
  cr_expect_gt(pgproxy_dropped(proxy), 0);
  cr_expect_not(keel_listener_is_active(f.l));
  keel_listener_stats st;
  keel_listener_get_stats(f.l, &st);
  cr_expect_not(st.hearing);
  cr_expect_geq(st.probes_missed, 1);
  cr_expect(strstr(keel_listener_last_error(f.l), "not hearing") != NULL, "%s",
            keel_listener_last_error(f.l));

  /* heard again: active once a probe comes back, after a gap event */
  pgproxy_drop_notifications(proxy, false);
  cr_assert(kt_wait_for(&f.loop, hearing_again, &f, 15000), "did not recover: %s",
            keel_listener_last_error(f.l));
  cr_expect_geq(gaps, 1, "no gap reported for the deaf time");
  keel_listener_close(f.l, on_closed, &f);
  cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000));
  pgproxy_stop(proxy);
  kt_loop_finish(&f.loop);
}

/* ---- a server that stops answering, its socket still up ---------------------- */

static void ignore_raw(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)l, (void)channel, (void)payload, (void)data;
}

static bool back_after_reset(void *ctx) {
  pfx *f = ctx;
  keel_listener_stats st;
  keel_listener_get_stats(f->l, &st);
  return st.reconnects >= 1 && gaps >= 1 && keel_listener_is_active(f->l);
}

/* Regression: the heartbeat had no deadline and kept the session from
 * looking idle to keel_pg's own check, so a listener whose server stopped
 * answering stayed "active" for ever (no_probe), or, with the probe, said
 * KEEL_ENOTHEARING once and then waited for ever on a LISTEN sent again. */
Test(listen_probe, a_server_that_stops_answering_is_reset) {
  for (int no_probe = 1; no_probe >= 0; no_probe--) {
    pfx f;
    keel_listener_opts o;
    char via[512];
    pgproxy *proxy = proxied_start(&f, &o, via, sizeof via);
    o.no_probe = no_probe != 0;
    o.heartbeat_ms = 200;
    o.connect_timeout_ms = 600;
    o.probe_interval_ms = 200;
    o.probe_timeout_ms = 600;
    cr_assert_eq(keel_listener_new(&f.loop, &o, &f.l), 0);
    cr_assert_eq(keel_listener_listen_channel(f.l, "keel_silent", ignore_raw, NULL), 0);
    cr_assert_eq(keel_listener_start(f.l), 0);
    uint64_t until = uv_now(&f.loop) + 10000;
    while (!keel_listener_is_active(f.l) && uv_now(&f.loop) < until) uv_run(&f.loop, UV_RUN_ONCE);
    cr_assert(keel_listener_is_active(f.l), "%s", keel_listener_last_error(f.l));
    /* the listener's session (and the probe's) now hear nothing back */
    pgproxy_silence_open_connections(proxy);
    cr_assert(kt_wait_for(&f.loop, back_after_reset, &f, 15000),
              "no_probe %d: not reset (active %d, gaps %d): %s", no_probe,
              keel_listener_is_active(f.l), gaps, keel_listener_last_error(f.l));
    keel_listener_close(f.l, on_closed, &f);
    cr_expect(kt_wait_for(&f.loop, is_closed, &f, 5000));
    pgproxy_stop(proxy);
    kt_loop_finish(&f.loop);
  }
}
