/* The integrity context without a database: its refusals, NULL-safe
 * accessors, the SQL builder's failure modes (a format over its buffer,
 * an invalid identifier, no memory) and how an error without a result or
 * connection is recorded. */
#include <criterion/criterion.h>
#include <string.h>

#include "integrity/integrity_internal.h"
#include "support/harness.h"

Test(context_edges, sql_builder_failures_stick) {
  keel__sql b = {0};
  keel__sql_add(&b, "SELECT ");
  keel__sql_ident(&b, "s.t", true);
  cr_assert_not(b.failed);
  cr_assert_str_eq(b.text, "SELECT \"s\".\"t\"");
  char big[300];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  keel__sql_addf(&b, "%s", big);
  cr_assert(b.failed, "a formatted piece over 255 bytes fails the builder");
  keel__sql_add(&b, " more");
  cr_assert_str_eq(b.text, "SELECT \"s\".\"t\"", "nothing is added after a failure");
  keel__sql_free(&b);
  cr_assert_null(b.text);

  keel__sql c = {0};
  keel__sql_ident(&c, NULL, false);
  cr_assert(c.failed);
  keel__sql_free(&c);
  keel__sql d = {0};
  keel__sql_ident(&d, "s.t", false);
  cr_assert(d.failed, "a qualified name where none is allowed");
  keel__sql_free(&d);

  kt_alloc_install();
  keel__sql e = {0};
  kt_alloc_fail_nth(0);
  keel__sql_add(&e, "x");
  kt_alloc_fail_nth(-1);
  cr_assert(e.failed, "no memory");
  cr_assert_null(e.text);
  keel__sql_free(&e);
}

Test(context_edges, refusals_and_null_accessors) {
  cr_assert_str_eq(keel_integrity_last_error(NULL), "context is NULL");
  cr_assert_str_eq(keel_integrity_last_sqlstate(NULL), "");
  keel_integrity_stats st;
  memset(&st, 0x3c, sizeof st);
  keel_integrity_get_stats(NULL, &st);
  cr_assert_eq(st.reserved_[0], 0x3c3c3c3c3c3c3c3cull, "untouched");
  keel_integrity_opts_init(NULL);
  keel_integrity_close(NULL, NULL, NULL);

  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = "host=127.0.0.1 port=1 connect_timeout=1";
  po.size = 1;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&loop, &po, &pool), 0);
  keel_integrity *ig = (keel_integrity *)&loop;
  keel_integrity_opts o;
  keel_integrity_opts_init(&o);
  cr_assert_eq(keel_integrity_new(NULL, pool, &o, &ig), UV_EINVAL);
  cr_assert_eq(keel_integrity_new(&loop, NULL, &o, &ig), UV_EINVAL);
  cr_assert_eq(keel_integrity_new(&loop, pool, &o, NULL), UV_EINVAL);
  o.retry.max_attempts = 0;
  cr_assert_eq(keel_integrity_new(&loop, pool, &o, &ig), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.slug_max_attempts = 0;
  cr_assert_eq(keel_integrity_new(&loop, pool, &o, &ig), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.retry.backoff.kind = (keel_backoff_kind)99;
  cr_assert_eq(keel_integrity_new(&loop, pool, &o, &ig), UV_EINVAL);
  keel_integrity_opts_init(&o);
  o.idempotency_table = "a.b.c";
  cr_assert_eq(keel_integrity_new(&loop, pool, &o, &ig), UV_EINVAL);
  cr_assert_eq(ig, (keel_integrity *)&loop, "*out untouched");

  cr_assert_eq(keel_integrity_new(&loop, pool, NULL, &ig), 0, "NULL opts: the defaults");
  /* an error without a result or a connection: its name is the text */
  keel__ig_record_error(ig, NULL, 0, NULL);
  cr_assert_str_eq(keel_integrity_last_error(ig), "", "success records nothing");
  keel__ig_record_error(ig, NULL, KEEL_ECONN, NULL);
  cr_assert_str_eq(keel_integrity_last_error(ig), keel_strerror(KEEL_ECONN));
  cr_assert_str_eq(keel_integrity_last_sqlstate(ig), "");
  keel__ig_record_error(ig, NULL, KEEL_EPG, NULL);
  cr_assert_str_eq(keel_integrity_last_error(ig), keel_strerror(KEEL_EPG));
  keel__ig_set_sqlstate(ig, "4000");
  cr_assert_str_eq(keel_integrity_last_sqlstate(ig), "", "not five characters");
  keel__ig_set_sqlstate(ig, "40001");
  cr_assert_str_eq(keel_integrity_last_sqlstate(ig), "40001");
  keel_integrity_stats s;
  keel_integrity_get_stats(ig, &s);
  cr_assert_eq(s.by_class[KEEL_SQLSTATE_CONNECTION], 1);
  keel_integrity_get_stats(ig, NULL);

  keel_integrity_close(ig, NULL, NULL);
  keel_integrity_close(ig, NULL, NULL); /* a second call does nothing */
  keel_pg_pool_close(pool, NULL, NULL);
  kt_loop_finish(&loop);
}
