/* The pg API's refusals and conninfo forms: every NULL and out-of-range
 * argument with its error and reason, calls after close, URI conninfos
 * (with and without the user's own keepalive settings), and a host list
 * with a port per host where the first host refuses. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/pg.h"
#include "support/harness.h"

typedef struct ax {
  int results;
  int statuses[16];
  char values[16][64];
} ax;

static void store(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)c;
  ax *x = data;
  int i = x->results++;
  x->statuses[i] = status;
  const char *v = keel_pg_result_value(res, 0, 0);
  snprintf(x->values[i], sizeof x->values[i], "%s", v ? v : "(null)");
}

/* A failure's result: no rows, no columns, nothing affected. */
static void store_failure(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  cr_assert_neq(status, 0);
  cr_assert_eq(keel_pg_result_nrows(res), 0);
  cr_assert_eq(keel_pg_result_ncols(res), 0);
  cr_assert_eq(keel_pg_result_col(res, "a"), -1);
  cr_assert_null(keel_pg_result_col_name(res, 0));
  cr_assert_eq(keel_pg_result_affected(res), 0);
  cr_assert_null(keel_pg_result_sqlstate(res));
  store(c, status, res, data);
}

static void wait_for(uv_loop_t *loop, ax *x, int n) {
  uint64_t start = uv_now(loop);
  while (x->results < n && uv_now(loop) - start < 15000) uv_run(loop, UV_RUN_ONCE);
  cr_assert_eq(x->results, n, "%d of %d", x->results, n);
}

/* The port of the test server, from its conninfo. */
static int test_port(void) {
  const char *p = strstr(kt_pg_conninfo(), "port=");
  cr_assert_not_null(p);
  return atoi(p + 5);
}

Test(pg_api, refused_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts_init(NULL);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  keel_pg *c = (keel_pg *)&loop;
  char why[256];
  cr_assert_eq(keel_pg_new_ex(NULL, &o, &c, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "loop, opts and out are required");
  cr_assert_eq(keel_pg_new_ex(&loop, NULL, &c, why, sizeof why), UV_EINVAL);
  cr_assert_eq(keel_pg_new_ex(&loop, &o, NULL, why, sizeof why), UV_EINVAL);
  cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "conninfo is required");
  o.conninfo = kt_pg_conninfo();
  o.reconnect_backoff.kind = (keel_backoff_kind)99;
  cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "reconnect_backoff is not valid");
  cr_assert_eq(c, (keel_pg *)&loop, "*out untouched");

  cr_assert_eq(keel_pg_query(NULL, "SELECT 1", 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query_cached(NULL, "SELECT 1", 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_not(keel_pg_is_connected(NULL));
  cr_assert_eq(keel_pg_backend_pid(NULL), 0);
  cr_assert_null(keel_pg_raw(NULL));
  cr_assert_str_eq(keel_pg_last_error(NULL), "connection is NULL");
  cr_assert_eq(keel_pg_reset(NULL), UV_EINVAL);
  keel_pg_stats st;
  memset(&st, 0x5a, sizeof st);
  keel_pg_get_stats(NULL, &st);
  cr_assert_eq(st.reserved_[0], 0x5a5a5a5a5a5a5a5aull, "untouched");
  keel_pg_close(NULL, NULL, NULL);

  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  cr_assert_eq(keel_pg_new(&loop, &o, &c), 0);
  const char *one[] = {"1"};
  cr_assert_eq(keel_pg_query(c, NULL, 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query(c, "SELECT $1", -1, one, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query(c, "SELECT $1", 1, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query(c, "SELECT 1", 65536, one, NULL, NULL), UV_EINVAL);
  cr_assert_str_neq(keel_pg_last_error(c), "");
  cr_assert_eq(keel_pg_query_cached(c, NULL, 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_query_cached(c, "SELECT $1", 1, NULL, NULL, NULL), UV_EINVAL);
  keel_pg_get_stats(c, NULL);
  ax x;
  memset(&x, 0, sizeof x);
  cr_assert_eq(keel_pg_query(c, "SELECT $1::int + 1", 1, one, store, &x), 0);
  cr_assert_eq(keel_pg_query(c, "SELECT 3", 0, NULL, NULL, NULL), 0, "no callback is allowed");
  cr_assert_eq(keel_pg_query(c, "SELECT 4", 0, NULL, store, &x), 0);
  wait_for(&loop, &x, 2);
  cr_assert_eq(x.statuses[0], 0);
  cr_assert_str_eq(x.values[0], "2");
  cr_assert_str_eq(x.values[1], "4");
  cr_assert_not_null(keel_pg_raw(c));
  /* Through a pooler it is the pooler's cancel key, any non-zero number. */
  if (kt_behind_pooler())
    cr_assert_neq(keel_pg_backend_pid(c), 0);
  else
    cr_assert_gt(keel_pg_backend_pid(c), 0);
  keel_pg_close(c, NULL, NULL);
  cr_assert_eq(keel_pg_query(c, "SELECT 1", 0, NULL, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_pg_query_cached(c, "SELECT 1", 0, NULL, NULL, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_pg_reset(c), KEEL_ECLOSING);
  keel_pg_close(c, NULL, NULL); /* a second close does nothing */
  kt_loop_finish(&loop);
}

static void run_one(const char *conninfo, const char *want) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = conninfo;
  o.keepalive_idle_s = 30;
  o.connect_timeout_ms = 3000;
  o.max_pending = 10;
  keel_backoff_fixed(&o.reconnect_backoff, 20);
  keel_pg *c;
  char why[256];
  cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), 0, "%s: %s", conninfo, why);
  ax x;
  memset(&x, 0, sizeof x);
  cr_assert_eq(keel_pg_query(c, "SELECT current_setting('application_name')", 0, NULL, store, &x),
               0);
  uint64_t start = uv_now(&loop);
  while (x.results < 1 && uv_now(&loop) - start < 15000) uv_run(&loop, UV_RUN_ONCE);
  cr_assert_eq(x.results, 1, "%s: %s", conninfo, keel_pg_last_error(c));
  cr_assert_eq(x.statuses[0], 0, "%s: %s", conninfo, keel_pg_last_error(c));
  cr_assert_str_eq(x.values[0], want);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(pg_api, uri_conninfos) {
  KT_SKIP_BEHIND_POOLER(
      "application_name belongs to the pooled server connection, set by whichever client used it "
      "last");
  char uri[256];
  snprintf(uri, sizeof uri, "postgresql://postgres@127.0.0.1:%d/postgres", test_port());
  run_one(uri, "");
  snprintf(uri, sizeof uri,
           "postgres://postgres@127.0.0.1:%d/postgres?application_name=kt_uri&keepalives=0",
           test_port());
  run_one(uri, "kt_uri");
  snprintf(uri, sizeof uri, "postgres://postgres@127.0.0.1:%d/postgres?application_name=kt_q",
           test_port());
  run_one(uri, "kt_q");
}

/* host=a,b port=p,q: one port per host, the names resolved off the loop;
 * the first refuses, the second answers. */
Test(pg_api, a_port_per_host) {
  char ci[256];
  snprintf(ci, sizeof ci,
           "host=localhost,localhost port=1,%d user=postgres dbname=postgres "
           "application_name=kt_ports",
           test_port());
  run_one(ci, "kt_ports");
}

/* More ports than hosts: libpq's own verdict, at keel_pg_new. */
Test(pg_api, port_list_mismatch_is_refused) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  char ci[256];
  snprintf(ci, sizeof ci, "host=localhost,localhost port=1,2,%d user=postgres dbname=postgres",
           test_port());
  o.conninfo = ci;
  keel_pg *c = NULL;
  char why[256] = "";
  ax x; /* outlives the connection: its statement is answered at close */
  memset(&x, 0, sizeof x);
  int rc = keel_pg_new_ex(&loop, &o, &c, why, sizeof why);
  if (rc == 0) {
    /* libpq refuses the list only when it connects: the state says why */
    cr_assert_eq(keel_pg_query(c, "SELECT 1", 0, NULL, store, &x), 0);
    uint64_t start = uv_now(&loop);
    while (strstr(keel_pg_last_error(c), "port") == NULL && uv_now(&loop) - start < 5000)
      uv_run(&loop, UV_RUN_ONCE);
    cr_assert(strstr(keel_pg_last_error(c), "port") != NULL, "%s", keel_pg_last_error(c));
    keel_pg_close(c, NULL, NULL);
    kt_loop_finish(&loop);
    cr_assert_eq(x.results, 1, "the statement is answered exactly once");
    cr_assert_neq(x.statuses[0], 0, "it never ran");
  } else {
    cr_assert_eq(rc, UV_EINVAL);
    cr_assert(strstr(why, "port") != NULL, "%s", why);
    cr_assert_null(c);
    kt_loop_finish(&loop);
  }
}

Test(pg_api, pool_refused_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_pool_opts_init(NULL);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  keel_pg_pool *p = NULL;
  cr_assert_eq(keel_pg_pool_new(&loop, &po, &p), UV_EINVAL, "no conninfo");
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 0;
  cr_assert_eq(keel_pg_pool_new(&loop, &po, &p), UV_EINVAL, "size 0");
  po.size = 1;
  po.conn.reconnect_backoff.kind = (keel_backoff_kind)99;
  cr_assert_eq(keel_pg_pool_new(&loop, &po, &p), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_new(NULL, &po, &p), UV_EINVAL);
  cr_assert_null(p);
  cr_assert_eq(keel_pg_pool_query(NULL, "SELECT 1", 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_acquire(NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_release(NULL, NULL), UV_EINVAL);
  cr_assert_str_eq(keel_pg_pool_last_error(NULL), "pool is NULL");
  keel_pg_pool_stats ps;
  memset(&ps, 0x11, sizeof ps);
  keel_pg_pool_get_stats(NULL, &ps);
  cr_assert_eq(ps.reserved_[0], 0x1111111111111111ull);

  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 1;
  cr_assert_eq(keel_pg_pool_new(&loop, &po, &p), 0);
  const char *one[] = {"1"};
  cr_assert_eq(keel_pg_pool_query(p, NULL, 0, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_query(p, "SELECT $1", -1, one, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_query(p, "SELECT $1", 1, NULL, NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_pg_pool_acquire(p, NULL, NULL), UV_EINVAL);
  cr_assert_str_eq(keel_pg_pool_last_error(p), "acquire callback is required");
  keel_pg_pool_get_stats(p, NULL);
  keel_pg_pool_close(p, NULL, NULL);
  kt_loop_finish(&loop);
}

/* A host list mixing an address and a name (only the name is resolved),
 * and hostaddr given with host (nothing to resolve): both connect. */
Test(pg_api, mixed_host_lists_and_hostaddr) {
  char ci[256];
  snprintf(ci, sizeof ci,
           "host=127.0.0.1,localhost port=%d user=postgres dbname=postgres "
           "application_name=kt_mixed",
           test_port());
  run_one(ci, "kt_mixed");
  snprintf(ci, sizeof ci,
           "host=localhost,127.0.0.1 port=1,%d user=postgres dbname=postgres "
           "application_name=kt_mixed2",
           test_port());
  run_one(ci, "kt_mixed2");
  snprintf(ci, sizeof ci,
           "hostaddr=127.0.0.1 host=localhost port=%d user=postgres dbname=postgres "
           "application_name=kt_hostaddr",
           test_port());
  run_one(ci, "kt_hostaddr");
}

/* A socket directory and an IPv6 literal need no name lookup: accepted at
 * keel_pg_new, closed cleanly whatever the connect does. */
Test(pg_api, socket_paths_and_ipv6_literals_are_accepted) {
  const char *cis[] = {"host=/nonexistent/kt_dir port=1 dbname=postgres",
                       "host=::1 port=1 dbname=postgres"};
  for (int i = 0; i < 2; i++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    keel_pg_opts o;
    keel_pg_opts_init(&o);
    o.conninfo = cis[i];
    keel_pg *c = NULL;
    char why[256];
    cr_assert_eq(keel_pg_new_ex(&loop, &o, &c, why, sizeof why), 0, "%s: %s", cis[i], why);
    ax x;
    memset(&x, 0, sizeof x);
    cr_assert_eq(keel_pg_query(c, "SELECT 1", 0, NULL, store_failure, &x), 0);
    uv_run(&loop, UV_RUN_NOWAIT);
    keel_pg_close(c, NULL, NULL);
    kt_loop_finish(&loop);
    cr_assert_eq(x.results, 1, "answered exactly once");
    cr_assert_neq(x.statuses[0], 0, "%s: nothing listens there", cis[i]);
  }
}
