/* The listener's API without a database: every refused argument with its
 * error code and reason, channel names at their limits, handlers replaced
 * and removed, calls after close, and the close callback on a later
 * iteration (nothing connects: the listener is never started). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "keel/listen.h"
#include "support/harness.h"

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l, (void)c, (void)data;
}
static void handler2(keel_listener *l, const keel_change *c, void *data) {
  (void)l, (void)c, (void)data;
}
static void raw_cb(keel_listener *l, const char *ch, const char *payload, void *data) {
  (void)l, (void)ch, (void)payload, (void)data;
}
static void count_close(void *obj, void *data) {
  (void)obj;
  ++*(int *)data;
}

Test(listener_api, channel_names_at_their_limits) {
  char why[256];
  cr_assert_eq(keel_listener_validate_channel("jobs", why, sizeof why), 0);
  cr_assert_str_eq(why, "");
  cr_assert_eq(keel_listener_validate_channel("_a$1", NULL, 0), 0, "why may be NULL");
  cr_assert_eq(keel_listener_validate_channel("\xc3\xa9t\xc3\xa9", why, sizeof why), 0, "2-byte");
  cr_assert_eq(keel_listener_validate_channel("\xe2\x82\xac", why, sizeof why), 0, "3-byte");
  cr_assert_eq(keel_listener_validate_channel("\xf0\x9f\x98\x80x", why, sizeof why), 0, "4-byte");
  char max[70];
  memset(max, 'c', 63);
  max[63] = '\0';
  cr_assert_eq(keel_listener_validate_channel(max, why, sizeof why), 0, "63 bytes");
  static const struct {
    const char *channel;
    const char *reason;
  } bad[] = {
      {NULL, "NULL"},
      {"", "empty"},
      {"1abc", "byte 0 is '1'"},
      {"$x", "byte 0 is '$'"},
      {"a.b", "byte 1 is '.'"},
      {"a b", "byte 1 is ' '"},
      {"a\x01", "byte 1 is '?'"},
      {"\xff", "not valid UTF-8"},
      {"\xc1\x81", "not valid UTF-8"},
      {"\xf5\x80\x80\x80", "not valid UTF-8"},
      {"a\xc3", "not valid UTF-8"},
      {"a\xe2\x82", "not valid UTF-8"},
      {"\xe2(\xa1", "not valid UTF-8"},
      {"\x80", "not valid UTF-8"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cr_assert_eq(keel_listener_validate_channel(bad[i].channel, why, sizeof why), UV_EINVAL, "%zu",
                 i);
    cr_assert(strstr(why, bad[i].reason) != NULL, "%zu: want \"%s\" in \"%s\"", i, bad[i].reason,
              why);
    cr_assert_eq(keel_listener_validate_channel(bad[i].channel, NULL, 0), UV_EINVAL);
  }
  memset(max, 'c', 64);
  max[64] = '\0';
  cr_assert_eq(keel_listener_validate_channel(max, why, sizeof why), UV_EINVAL);
  cr_assert(strstr(why, "longer than 63 bytes (64)") != NULL, "%s", why);
  char tiny[8];
  cr_assert_eq(keel_listener_validate_channel("1", tiny, sizeof tiny), UV_EINVAL);
  cr_assert_eq(strlen(tiny), sizeof tiny - 1, "the reason is truncated to why_cap");
}

Test(listener_api, new_refuses_what_it_cannot_use) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_listener_opts_init(NULL); /* NULL-safe */
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  keel_listener *l = (keel_listener *)&loop; /* must stay untouched */
  char why[256];
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL, "no conninfo");
  cr_assert(strstr(why, "conninfo") != NULL, "%s", why);
  cr_assert_eq(keel_listener_new(NULL, &o, &l), UV_EINVAL);
  cr_assert_eq(keel_listener_new(&loop, NULL, &l), UV_EINVAL);
  o.conninfo = "host=127.0.0.1";
  cr_assert_eq(keel_listener_new(&loop, &o, NULL), UV_EINVAL);
  o.reconnect_backoff.base_ms = 100;
  o.reconnect_backoff.max_ms = 50; /* a cap below the base */
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "invalid reconnect_backoff");
  keel_listener_opts_init(&o);
  o.conninfo = "host=127.0.0.1";
  o.table = "a.b.c";
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "invalid table name");
  o.table = "t";
  o.events = 8;
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL);
  cr_assert(strstr(why, "events") != NULL, "%s", why);
  o.events = KEEL_CHANGE_ALL;
  o.channel = "bad channel";
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, NULL, 0), UV_EINVAL, "why may be NULL");
  o.channel = NULL;
  o.filter = "a=zz.1";
  cr_assert_eq(keel_listener_new_ex(&loop, &o, &l, why, sizeof why), UV_EINVAL);
  cr_assert_str_neq(why, "");
  cr_assert_eq(l, (keel_listener *)&loop, "*out untouched on failure");
  kt_loop_finish(&loop);
}

Test(listener_api, every_call_checks_its_arguments) {
  /* NULL listener */
  cr_assert_eq(keel_listener_add_table(NULL, "t", KEEL_CHANGE_ALL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_listen_channel(NULL, "c", raw_cb, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_on(NULL, "h", handler, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_off(NULL, "h"), UV_EINVAL);
  cr_assert_eq(keel_listener_start(NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_stop(NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_gap_window(NULL, NULL, NULL), UV_EINVAL);
  cr_assert_not(keel_listener_is_active(NULL));
  cr_assert_str_eq(keel_listener_last_error(NULL), "listener is NULL");
  keel_listener_stats st;
  memset(&st, 0xab, sizeof st);
  keel_listener_get_stats(NULL, &st);
  cr_assert_eq(st.received, 0xababababababababull, "untouched");
  keel_listener_close(NULL, NULL, NULL);

  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = "host=127.0.0.1";
  keel_listener *l;
  cr_assert_eq(keel_listener_new(&loop, &o, &l), 0, "no table: raw channels only");
  cr_assert_str_eq(keel_listener_last_error(l), "");
  cr_assert_eq(keel_listener_add_table(l, NULL, KEEL_CHANGE_ALL, NULL, NULL), UV_EINVAL);
  cr_assert_str_eq(keel_listener_last_error(l), "invalid table name");
  cr_assert_eq(keel_listener_add_table(l, "t", 0, NULL, NULL), UV_EINVAL);
  cr_assert(strstr(keel_listener_last_error(l), "events") != NULL);
  cr_assert_eq(keel_listener_add_table(l, "t", KEEL_CHANGE_ALL, NULL, "9x"), UV_EINVAL);
  cr_assert(strstr(keel_listener_last_error(l), "channel \"9x\"") != NULL, "%s",
            keel_listener_last_error(l));
  cr_assert_eq(keel_listener_add_table(l, "t", KEEL_CHANGE_ALL, "id=eq", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_add_table(l, "s.t", KEEL_CHANGE_INSERT, "id=eq.1", "mine"), 0);
  cr_assert_eq(keel_listener_add_table(l, "t2", KEEL_CHANGE_DELETE, NULL, NULL), 0);

  cr_assert_eq(keel_listener_listen_channel(l, "c", NULL, NULL), UV_EINVAL);
  cr_assert(strstr(keel_listener_last_error(l), "cb is required") != NULL);
  cr_assert_eq(keel_listener_listen_channel(l, "no way", raw_cb, NULL), UV_EINVAL);
  cr_assert(strstr(keel_listener_last_error(l), "byte 2 is ' '") != NULL, "%s",
            keel_listener_last_error(l));
  cr_assert_eq(keel_listener_listen_channel(l, "raw1", raw_cb, NULL), 0);
  cr_assert_eq(keel_listener_listen_channel(l, "raw2", raw_cb, NULL), 0);

  cr_assert_eq(keel_listener_on(l, NULL, handler, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_on(l, "h", NULL, NULL), UV_EINVAL);
  cr_assert(strstr(keel_listener_last_error(l), "id and handler") != NULL);
  cr_assert_eq(keel_listener_on(l, "h", handler, NULL), 0);
  cr_assert_eq(keel_listener_on(l, "h", handler2, NULL), 0, "the same id replaces");
  cr_assert_eq(keel_listener_on(l, "g", handler, NULL), 0);
  cr_assert_eq(keel_listener_off(l, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_off(l, "h"), 0);
  cr_assert_eq(keel_listener_off(l, "h"), KEEL_ENOTFOUND, "removed once");
  cr_assert_eq(keel_listener_off(l, "nope"), KEEL_ENOTFOUND);

  int64_t from = -5, to = -5;
  cr_assert_eq(keel_listener_gap_window(l, &from, &to), KEEL_ENOTFOUND, "no gap yet");
  cr_assert(from == -5 && to == -5, "out-params untouched");
  cr_assert_not(keel_listener_is_active(l));
  cr_assert_eq(keel_listener_stop(l), 0, "stop when not started");
  keel_listener_get_stats(l, NULL);
  keel_listener_get_stats(l, &st);
  cr_assert_eq(st.received, 0);
  cr_assert_not(st.active);
  cr_assert_eq(st.reserved_[0], 0);

  int closed = 0;
  keel_listener_close(l, count_close, &closed);
  keel_listener_close(l, count_close, &closed); /* a second call does nothing */
  cr_assert_eq(closed, 0, "never inside the call");
  cr_assert_eq(keel_listener_add_table(l, "t", KEEL_CHANGE_ALL, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_listen_channel(l, "c", raw_cb, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_on(l, "h", handler, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_off(l, "g"), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_start(l), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_stop(l), KEEL_ECLOSING);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(closed, 1);
  kt_loop_finish(&loop);
}

static void build_scenario(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = "host=127.0.0.1";
  o.table = "s.t";
  o.filter = "id=in.(1,2)&name=eq.x";
  keel_listener *l = NULL;
  int rc = keel_listener_new(&loop, &o, &l);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    cr_assert_null(l);
    kt_loop_finish(&loop);
    return;
  }
  int ok = 0;
  rc = keel_listener_add_table(l, "t2", KEEL_CHANGE_UPDATE, "n=gt.3", "other");
  cr_assert(rc == 0 || rc == UV_ENOMEM, "%d", rc);
  ok += rc == 0;
  rc = keel_listener_on(l, "h", handler, NULL);
  cr_assert(rc == 0 || rc == UV_ENOMEM, "%d", rc);
  ok += rc == 0;
  rc = keel_listener_listen_channel(l, "raw", raw_cb, NULL);
  cr_assert(rc == 0 || rc == UV_ENOMEM, "%d", rc);
  ok += rc == 0;
  if (kt_failmalloc_index() < 0) cr_assert_eq(ok, 3);
  int closed = 0;
  keel_listener_close(l, count_close, &closed);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(closed, 1, "the close callback runs once");
  kt_loop_finish(&loop);
}

Test(listener_api, building_a_listener_with_allocations_failing) {
  kt_failmalloc_run(build_scenario, NULL);
  cr_assert_gt(kt_failmalloc_count(), 10);
}
