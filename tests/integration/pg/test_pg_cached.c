/* keel_pg_query_cached: prepared once per session, executed by name; a
 * failing PREPARE reports its own error; a new session prepares again. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/pg.h"
#include "support/harness.h"

typedef struct cx {
  int results;
  int statuses[64];
  char values[64][32];
  char sqlstate[8];
} cx;

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  cx *x = data;
  int i = x->results++;
  x->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(x->values[i], 32, "%s", v ? v : "(null)");
  const char *state = keel_pg_result_sqlstate(res);
  snprintf(x->sqlstate, sizeof x->sqlstate, "%s", state ? state : "");
}

static void wait_for(uv_loop_t *loop, cx *x, int n) {
  uint64_t start = uv_now(loop);
  while (x->results < n && uv_now(loop) - start < 10000) uv_run(loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n);
}

Test(pg_cached, prepared_once_then_by_name_and_again_after_reconnect) {
  KT_SKIP_BEHIND_POOLER("looks up its own backend by pid and kills it");
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  keel_pg *c;
  cr_assert_eq(keel_pg_new(&loop, &o, &c), 0);
  cx x;
  memset(&x, 0, sizeof x);
  char num[8];
  for (int i = 0; i < 10; i++) {
    snprintf(num, sizeof num, "%d", i);
    const char *p[] = {num};
    cr_assert_eq(keel_pg_query_cached(c, "SELECT $1::int * 2", 1, p, store, &x), 0);
  }
  wait_for(&loop, &x, 10);
  for (int i = 0; i < 10; i++) {
    cr_assert_eq(x.statuses[i], 0);
    snprintf(num, sizeof num, "%d", i * 2);
    cr_assert_str_eq(x.values[i], num);
  }
  char *count = NULL;
  char sql[200];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %d",
           keel_pg_backend_pid(c));
  count = kt_pg_scalar(sql);
  cr_assert_str_eq(count, "1");
  free(count);
  /* A statement that cannot be prepared reports the real error. */
  cr_assert_eq(keel_pg_query_cached(c, "SELECT no_such_column", 0, NULL, store, &x), 0);
  wait_for(&loop, &x, 11);
  cr_assert_eq(x.statuses[10], KEEL_EPG);
  cr_assert_str_eq(x.sqlstate, "42703");
  /* A new session prepares again. */
  int pid = keel_pg_backend_pid(c);
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)", pid);
  free(kt_pg_scalar(sql));
  uint64_t start = uv_now(&loop);
  while ((keel_pg_backend_pid(c) == pid || !keel_pg_is_connected(c)) &&
         uv_now(&loop) - start < 10000)
    uv_run(&loop, UV_RUN_ONCE);
  const char *p[] = {"21"};
  keel_pg_query_cached(c, "SELECT $1::int * 2", 1, p, store, &x);
  wait_for(&loop, &x, 12);
  cr_assert_eq(x.statuses[11], 0, "%s", keel_pg_last_error(c));
  cr_assert_str_eq(x.values[11], "42");
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&loop);
}
