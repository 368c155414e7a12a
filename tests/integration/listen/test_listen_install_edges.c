/* The trigger installer's refusals and odd inputs: every bad argument with
 * its error, every buffer too small (UV_ENOBUFS, never a cut statement),
 * key columns with blanks, table names at the 63-byte limit with
 * multi-byte characters, a primary key looked up (or missing), an unknown
 * table, and a filter that contains the installer's own quoting tag. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/listen.h"
#include "support/harness.h"

Test(install_edges, sql_refusals) {
  char buf[16384];
  cr_assert_eq(keel_listener_install_sql(NULL, sizeof buf, "t", "id", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, NULL, "id", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, "a.b.c", "id", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, "t", NULL, NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, "t", "", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, "t", "id, ,x", NULL), UV_EINVAL);
  cr_assert_eq(keel_listener_install_sql(buf, sizeof buf, "t", "id", "bad channel"), UV_EINVAL);
  cr_assert_eq(keel_listener_install_filtered_sql(buf, sizeof buf, "t", "id", NULL, 0, NULL),
               UV_EINVAL);
  cr_assert_eq(keel_listener_install_filtered_sql(buf, sizeof buf, "t", "id", NULL, 8, NULL),
               UV_EINVAL);
  cr_assert_eq(keel_listener_install_filtered_sql(buf, sizeof buf, "t", "id", NULL, KEEL_CHANGE_ALL,
                                                  "x=zz.1"),
               UV_EINVAL);
}

Test(install_edges, every_short_buffer_is_enobufs) {
  static char full[32768], small[32768];
  const char *filter = "status=in.(a,b)&n=gt.3";
  int len = keel_listener_install_filtered_sql(full, sizeof full, "s.t", " tenant_id , id ", "ch",
                                               KEEL_CHANGE_INSERT | KEEL_CHANGE_DELETE, filter);
  cr_assert_gt(len, 0);
  cr_assert(strstr(full, "E'tenant_id', E'id'") != NULL, "blanks around key columns are trimmed");
  cr_assert(strstr(full, "INSERT") != NULL && strstr(full, "DELETE") != NULL);
  for (int cap = 0; cap <= len; cap += (cap < 200 || cap > len - 200) ? 1 : 97)
    cr_assert_eq(
        keel_listener_install_filtered_sql(small, (size_t)cap, "s.t", " tenant_id , id ", "ch",
                                           KEEL_CHANGE_INSERT | KEEL_CHANGE_DELETE, filter),
        UV_ENOBUFS, "cap %d of %d", cap, len);
  cr_assert_eq(
      keel_listener_install_filtered_sql(small, (size_t)len + 1, "s.t", " tenant_id , id ", "ch",
                                         KEEL_CHANGE_INSERT | KEEL_CHANGE_DELETE, filter),
      len);
  cr_assert_str_eq(small, full);
}

/* 63-byte table names of two-byte characters: the trigger names are cut
 * on a character boundary and stay distinct. */
Test(install_edges, long_multibyte_table_names) {
  char a[64], b[64];
  size_t n = 0;
  while (n + 2 <= 62) a[n] = (char)0xc3, a[n + 1] = (char)0xa9, n += 2; /* é */
  a[n++] = 'a';
  a[n] = '\0';
  memcpy(b, a, sizeof a);
  b[n - 1] = 'b';
  static char sa[16384], sb[16384];
  cr_assert_gt(keel_listener_install_sql(sa, sizeof sa, a, "id", NULL), 0);
  cr_assert_gt(keel_listener_install_sql(sb, sizeof sb, b, "id", NULL), 0);
  const char *ta = strstr(sa, "CREATE TRIGGER \"keel_notify_");
  const char *tb = strstr(sb, "CREATE TRIGGER \"keel_notify_");
  cr_assert(ta != NULL && tb != NULL);
  const char *ea = strchr(ta + 16, '"'), *eb = strchr(tb + 16, '"');
  size_t la = (size_t)(ea - ta - 16), lb = (size_t)(eb - tb - 16);
  cr_assert_leq(la, 63, "%zu", la);
  cr_assert(la != lb || memcmp(ta, tb, la + 16) != 0, "distinct names");
  /* never a broken character: the cut name is valid UTF-8 before the hash */
  const unsigned char *name = (const unsigned char *)ta + 16;
  for (size_t i = 0; i < la;) {
    if (name[i] < 0x80) {
      i++;
      continue;
    }
    cr_assert_eq(name[i], 0xc3, "a character starts at %zu", i);
    cr_assert_eq(name[i + 1], 0xa9);
    i += 2;
  }
}

typedef struct ix {
  int calls;
  int status;
} ix;

static void on_installed(keel_pg *c, int status, void *data) {
  (void)c;
  ix *x = data;
  x->calls++;
  x->status = status;
}

static void wait_calls(uv_loop_t *loop, ix *x) {
  uint64_t start = uv_now(loop);
  while (x->calls == 0 && uv_now(loop) - start < 20000) uv_run(loop, UV_RUN_ONCE);
  cr_assert_eq(x->calls, 1);
}

Test(install_edges, installs_through_a_connection) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  keel_pg *c;
  cr_assert_eq(keel_pg_new(&loop, &o, &c), 0);
  char pk[64], nopk[64], sql[512];
  kt_unique_name(pk, sizeof pk, "inst_pk");
  kt_unique_name(nopk, sizeof nopk, "inst_nopk");
  snprintf(sql, sizeof sql,
           "CREATE TABLE %s (tenant int, id int, name text, PRIMARY KEY (tenant, id)); "
           "CREATE TABLE %s (n int)",
           pk, nopk);
  kt_pg_exec(sql);

  ix x = {0, 0};
  cr_assert_eq(keel_listener_install(NULL, pk, NULL, NULL, on_installed, &x), UV_EINVAL);
  cr_assert_eq(keel_listener_install(c, NULL, NULL, NULL, on_installed, &x), UV_EINVAL);
  cr_assert_eq(keel_listener_install(c, pk, NULL, "9ch", on_installed, &x), UV_EINVAL);
  cr_assert_eq(keel_listener_install_filtered(c, pk, NULL, NULL, 0, NULL, on_installed, &x),
               UV_EINVAL);
  cr_assert_eq(keel_listener_install_filtered(c, pk, NULL, NULL, KEEL_CHANGE_ALL, "x=zz.1",
                                              on_installed, &x),
               UV_EINVAL);
  cr_assert_eq(keel_listener_install(c, pk, ",", NULL, on_installed, &x), UV_EINVAL);

  /* the primary key is looked up: (tenant, id) */
  cr_assert_eq(keel_listener_install(c, pk, NULL, NULL, on_installed, &x), 0);
  cr_assert_eq(x.calls, 0, "never inside the call");
  wait_calls(&loop, &x);
  cr_assert_eq(x.status, 0, "%s", keel_pg_last_error(c));
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_trigger WHERE tgrelid = '%s'::regclass AND NOT tgisinternal",
           pk);
  char *count = kt_pg_scalar(sql);
  cr_assert_str_eq(count, "1");
  free(count);

  /* no primary key and no key columns named */
  x.calls = 0;
  cr_assert_eq(keel_listener_install(c, nopk, NULL, NULL, on_installed, &x), 0);
  wait_calls(&loop, &x);
  cr_assert_eq(x.status, KEEL_ENOTFOUND);

  /* a table that does not exist */
  x.calls = 0;
  cr_assert_eq(keel_listener_install(c, "kt_no_such_table_at_all", NULL, NULL, on_installed, &x),
               0);
  wait_calls(&loop, &x);
  cr_assert_eq(x.status, KEEL_EPG);
  cr_assert(strstr(keel_pg_last_error(c), "kt_no_such_table_at_all") != NULL, "%s",
            keel_pg_last_error(c));

  /* a filter holding the DO block's first dollar-quote tag: another tag */
  x.calls = 0;
  cr_assert_eq(keel_listener_install_filtered(c, pk, "tenant,id", NULL, KEEL_CHANGE_ALL,
                                              "name=eq.$keel_install_0$", on_installed, &x),
               0);
  wait_calls(&loop, &x);
  cr_assert_eq(x.status, 0, "%s", keel_pg_last_error(c));
  snprintf(sql, sizeof sql,
           "SELECT count(*) FROM pg_trigger WHERE tgrelid = '%s'::regclass AND NOT tgisinternal",
           pk);
  count = kt_pg_scalar(sql);
  cr_assert_str_eq(count, "3", "one trigger per operation with a filter");
  free(count);

  /* a filter on a column the table lacks fails as a whole: the old
   * triggers stay */
  x.calls = 0;
  cr_assert_eq(keel_listener_install_filtered(c, pk, "tenant,id", NULL, KEEL_CHANGE_ALL,
                                              "nope=eq.1", on_installed, &x),
               0);
  wait_calls(&loop, &x);
  cr_assert_eq(x.status, KEEL_EPG);
  count = kt_pg_scalar(sql);
  cr_assert_str_eq(count, "3");
  free(count);

  /* cb may be NULL */
  cr_assert_eq(keel_listener_install(c, pk, "tenant,id", NULL, NULL, NULL), 0);
  keel_pg_close(c, NULL, NULL);
  kt_loop_finish(&loop);
  snprintf(sql, sizeof sql, "DROP TABLE %s; DROP TABLE %s", pk, nopk);
  kt_pg_exec(sql);
}
