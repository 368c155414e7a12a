/* The listener, exact (issue 12), against the real PostgreSQL: channels
 * validated everywhere, forged notifications, filter literals and generated
 * SQL under both settings of standard_conforming_strings, filters checked
 * against the table's columns and types when the listener starts. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "keel/listen.h"
#include "support/harness.h"

typedef struct fixture {
  uv_loop_t loop;
  keel_listener *l;
  char table[64];
  char channel[80];
  int delivered;
  int errors;
  int last_err;
  char names[16][64];
} fixture;

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  fixture *f = data;
  const char *name = keel_change_new(c, "name");
  if (name == NULL) name = keel_change_old(c, "name");
  if (f->delivered < 16) snprintf(f->names[f->delivered], 64, "%s", name ? name : "(null)");
  f->delivered++;
}

static void on_error(keel_listener *l, int err, const char *message, void *data) {
  (void)l;
  (void)message;
  fixture *f = data;
  f->errors++;
  f->last_err = err;
}

static void exec_fmt(const char *fmt, const char *a) {
  char sql[1024];
  snprintf(sql, sizeof sql, fmt, a, a, a);
  kt_pg_exec(sql);
}

static int scalar_int(const char *sql) {
  char *v = kt_pg_scalar(sql);
  int n = v != NULL ? (int)strtol(v, NULL, 10) : -1;
  free(v);
  return n;
}

static int trigger_count(const char *table) {
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_trigger WHERE tgrelid = '%s'::regclass",
           table);
  return scalar_int(sql);
}

static void new_listener(fixture *f, const char *filter) {
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.table = f->table;
  o.channel = f->channel;
  o.filter = filter;
  o.heartbeat_ms = 500;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 50);
  o.on_error = on_error;
  o.data = f;
  char why[256];
  cr_assert_eq(keel_listener_new_ex(&f->loop, &o, &f->l, why, sizeof why), 0, "%s", why);
  cr_assert_eq(keel_listener_on(f->l, "h", handler, f), 0);
}

static bool run_until_active(fixture *f, uint64_t ms) {
  uint64_t start = uv_now(&f->loop);
  while (!keel_listener_is_active(f->l) && uv_now(&f->loop) - start < ms)
    uv_run(&f->loop, UV_RUN_ONCE);
  return keel_listener_is_active(f->l);
}

static void run_until_delivered(fixture *f, int n) {
  uint64_t start = uv_now(&f->loop);
  while (f->delivered < n && uv_now(&f->loop) - start < 10000) uv_run(&f->loop, UV_RUN_ONCE);
  cr_assert_eq(f->delivered, n, "delivered %d, expected %d", f->delivered, n);
}

static void setup(fixture *f, const char *columns) {
  memset(f, 0, sizeof *f);
  uv_loop_init(&f->loop);
  kt_unique_name(f->table, sizeof f->table, "lx");
  kt_unique_name(f->channel, sizeof f->channel, "lxc");
  char sql[1024];
  snprintf(sql, sizeof sql, "CREATE TABLE %s (%s)", f->table, columns);
  kt_pg_exec(sql);
}

static void teardown(fixture *f) {
  keel_listener_close(f->l, NULL, NULL);
  kt_loop_finish(&f->loop);
  exec_fmt("DROP TABLE %s", f->table);
}

static void install_plain(fixture *f) {
  char sql[8192];
  cr_assert_gt(keel_listener_install_sql(sql, sizeof sql, f->table, "id", f->channel), 0);
  kt_pg_exec(sql);
}

/* ---- item 4: channels ------------------------------------------------------- */

static void on_raw(keel_listener *l, const char *channel, const char *payload, void *data) {
  (void)l;
  (void)channel;
  (void)payload;
  (void)data;
}

static void installed_flag(keel_pg *conn, int status, void *data) {
  (void)conn;
  (void)status;
  *(bool *)data = true;
}

Test(listen_exact, bad_channels_are_refused_everywhere_and_install_nothing) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, name text");
  char longest[80];
  memset(longest, 'c', 64);
  longest[64] = '\0';
  const char *bad[] = {"", longest, "a.b", "a b", "9abc", "a'b", "a\"b", "a-b", "\xC3", "a\xC3("};
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = kt_pg_conninfo();
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f.loop, &po, &conn), 0);
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  keel_listener *raw_only;
  cr_assert_eq(keel_listener_new(&f.loop, &o, &raw_only), 0);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char why[256] = "";
    cr_assert_eq(keel_listener_validate_channel(bad[i], why, sizeof why), UV_EINVAL, "%s", bad[i]);
    cr_assert_str_neq(why, "", "a reason for \"%s\"", bad[i]);
    o.table = f.table;
    o.channel = bad[i];
    keel_listener *l = (keel_listener *)0x1;
    why[0] = '\0';
    cr_assert_eq(keel_listener_new_ex(&f.loop, &o, &l, why, sizeof why), UV_EINVAL, "%s", bad[i]);
    cr_assert_eq(l, (keel_listener *)0x1);
    cr_assert(strstr(why, "channel") != NULL, "%s", why);
    cr_assert_eq(keel_listener_add_table(raw_only, f.table, KEEL_CHANGE_ALL, NULL, bad[i]),
                 UV_EINVAL);
    cr_assert(strstr(keel_listener_last_error(raw_only), "channel") != NULL);
    cr_assert_eq(keel_listener_listen_channel(raw_only, bad[i], on_raw, NULL), UV_EINVAL);
    char sql[8192];
    cr_assert_eq(keel_listener_install_sql(sql, sizeof sql, f.table, "id", bad[i]), UV_EINVAL);
    cr_assert_eq(keel_listener_install_filtered_sql(sql, sizeof sql, f.table, "id", bad[i],
                                                    KEEL_CHANGE_ALL, "name=eq.x"),
                 UV_EINVAL);
    bool done = false;
    cr_assert_eq(keel_listener_install(conn, f.table, NULL, bad[i], installed_flag, &done),
                 UV_EINVAL);
    cr_assert_eq(keel_listener_install_filtered(conn, f.table, "id", bad[i], KEEL_CHANGE_ALL, NULL,
                                                installed_flag, &done),
                 UV_EINVAL);
    cr_assert(!done);
  }
  cr_assert_eq(keel_listener_validate_channel(NULL, NULL, 0), UV_EINVAL);
  keel_listener_close(raw_only, NULL, NULL);
  keel_pg_close(conn, NULL, NULL);
  uv_run(&f.loop, UV_RUN_DEFAULT);
  cr_assert_eq(trigger_count(f.table), 0, "nothing was installed");

  /* The longest valid channel, mixed case and non-ASCII, end to end. */
  int n = snprintf(f.channel, sizeof f.channel, "Ch_\xC3\xA9$9_%d_", (int)getpid() % 100000);
  while (n < 63) f.channel[n++] = 'Z';
  f.channel[n] = '\0';
  cr_assert_eq(keel_listener_validate_channel(f.channel, NULL, 0), 0);
  install_plain(&f);
  new_listener(&f, NULL);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  exec_fmt("INSERT INTO %s (name) VALUES ('ok')", f.table);
  run_until_delivered(&f, 1);
  cr_assert_str_eq(f.names[0], "ok");
  teardown(&f);
}

/* ---- item 9: forged notifications ---------------------------------------- */

Test(listen_exact, forged_notify_with_extreme_times_is_malformed_not_undefined) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, name text");
  install_plain(&f);
  new_listener(&f, NULL);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  const char *times[] = {"-9223372036854775808", "9223372036854775807", "-1", "253402300800000000"};
  for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT pg_notify('%s', '{\"op\":\"INSERT\",\"schema\":\"public\",\"table\":\"%s\","
             "\"ts_us\":%s,\"pk\":{\"id\":1},\"new\":{\"id\":1,\"name\":\"forged\"}}')",
             f.channel, f.table, times[i]);
    free(kt_pg_scalar(sql));
  }
  exec_fmt("INSERT INTO %s (name) VALUES ('real')", f.table);
  run_until_delivered(&f, 1);
  cr_assert_str_eq(f.names[0], "real");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.malformed, 4);
  cr_assert(strstr(keel_listener_last_error(f.l), "ts_us") != NULL, "%s",
            keel_listener_last_error(f.l));
  teardown(&f);
}

/* ---- item 8: literals under both settings of standard_conforming_strings -- */

static void hostile_filter_case(bool conforming) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, name text");
  char pwned[64], value[256], filter[300];
  kt_unique_name(pwned, sizeof pwned, "pwned");
  snprintf(value, sizeof value, "a\\'); CREATE TABLE %s (x int); --", pwned);
  snprintf(filter, sizeof filter, "name=eq.%s", value);
  static char sql[32768];
  int at = snprintf(sql, sizeof sql, "SET standard_conforming_strings = %s;\n",
                    conforming ? "on" : "off");
  int n = keel_listener_install_filtered_sql(sql + at, sizeof sql - (size_t)at, f.table, "id",
                                             f.channel, KEEL_CHANGE_ALL, filter);
  cr_assert_gt(n, 0);
  kt_pg_exec(sql); /* as one string, as a migration tool would */
  char check[256];
  snprintf(check, sizeof check, "SELECT to_regclass('%s') IS NULL", pwned);
  char *absent = kt_pg_scalar(check);
  cr_assert_str_eq(absent, "t", "the filter's value ran as SQL");
  free(absent);
  cr_assert_eq(trigger_count(f.table), 3);

  /* The same through keel's installer on a session with the setting. */
  char conninfo[512];
  snprintf(conninfo, sizeof conninfo, "%s options='-c standard_conforming_strings=%s'",
           kt_pg_conninfo(), conforming ? "on" : "off");
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = conninfo;
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f.loop, &po, &conn), 0);
  bool done = false;
  cr_assert_eq(keel_listener_install_filtered(conn, f.table, NULL, f.channel, KEEL_CHANGE_ALL,
                                              filter, installed_flag, &done),
               0);
  while (!done) uv_run(&f.loop, UV_RUN_ONCE);
  keel_pg_close(conn, NULL, NULL);
  snprintf(check, sizeof check,
           "SELECT count(*) FROM pg_trigger WHERE tgrelid = '%s'::regclass AND "
           "pg_get_triggerdef(oid) LIKE '%%%s%%'",
           f.table, f.channel);
  cr_assert_eq(scalar_int(check), 3, "every trigger notifies on our channel");

  /* The trigger lets exactly the hostile value through, as the listener's
   * filter does. */
  new_listener(&f, filter);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  char insert[512];
  snprintf(insert, sizeof insert,
           "INSERT INTO %s (name) VALUES ($v$a$v$), ($v$%s$v$), ($v$a\\$v$), ($v$a'$v$)", f.table,
           value);
  kt_pg_exec(insert);
  exec_fmt("INSERT INTO %s (name) VALUES ('last')", f.table);
  run_until_delivered(&f, 1);
  uv_sleep(200);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert_eq(f.delivered, 1);
  cr_assert_str_eq(f.names[0], value);
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.received, 1, "the trigger sent only the matching row");
  teardown(&f);
}

Test(listen_exact, filter_literals_safe_with_standard_conforming_strings_off) {
  hostile_filter_case(false);
}

Test(listen_exact, filter_literals_safe_with_standard_conforming_strings_on) {
  hostile_filter_case(true);
}

/* ---- item 5: filters checked against the table when the listener starts -- */

static void refused_case(const char *filter, const char *expect) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, team_id int, name text, flag boolean, at timestamptz");
  install_plain(&f);
  new_listener(&f, filter);
  cr_assert_eq(keel_listener_start(f.l), 0);
  uint64_t start = uv_now(&f.loop);
  while (f.errors == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.errors, 1, "%s: refused once", filter);
  cr_assert_eq(f.last_err, UV_EINVAL);
  cr_assert(!keel_listener_is_active(f.l));
  const char *why = keel_listener_last_error(f.l);
  cr_assert(strstr(why, expect) != NULL, "%s: %s", filter, why);
  /* nothing is delivered while refused: it never LISTENed */
  exec_fmt("INSERT INTO %s (team_id, name) VALUES (1, 'x')", f.table);
  uv_sleep(100);
  for (int i = 0; i < 10; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert_eq(f.delivered, 0);
  cr_assert(!keel_listener_is_active(f.l));
  teardown(&f);
}

Test(listen_exact, unknown_columns_and_values_of_the_wrong_type_are_refused_at_start) {
  refused_case("nope=eq.1", "no column \"nope\"");
  refused_case("team_id=eq.abc", "integer");
  refused_case("team_id=in.(1,2,x)", "integer");
  refused_case("team_id=gt.1.5", "integer");
  refused_case("at=lt.yesterday-ish", "timestamp");
  refused_case("name=is.true", "boolean");
  refused_case("flag=eq.maybe", "boolean");
}

Test(listen_exact, a_valid_typed_filter_is_accepted_and_delivers) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, team_id int, name text, flag boolean, at timestamptz");
  install_plain(&f);
  new_listener(&f, "team_id=in.(1,2)&name=neq.skip&flag=is.true&at=gt.2020-01-01 00:00:00+00");
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  cr_assert_eq(f.errors, 0, "%s", keel_listener_last_error(f.l));
  exec_fmt(
      "INSERT INTO %s (team_id, name, flag, at) VALUES (1, 'skip', true, now()), "
      "(3, 'no', true, now()), (2, 'yes', true, now())",
      f.table);
  run_until_delivered(&f, 1);
  cr_assert_str_eq(f.names[0], "yes");

  /* a table added later with a bad filter: refused, inactive, says why */
  char other[64], sql[256];
  kt_unique_name(other, sizeof other, "lxo");
  snprintf(sql, sizeof sql, "CREATE TABLE %s (id int PRIMARY KEY, n int)", other);
  kt_pg_exec(sql);
  cr_assert_eq(keel_listener_add_table(f.l, other, KEEL_CHANGE_ALL, "n=eq.zz", f.channel), 0);
  uint64_t start = uv_now(&f.loop);
  while (f.errors == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.errors, 1);
  cr_assert(!keel_listener_is_active(f.l));
  cr_assert(strstr(keel_listener_last_error(f.l), "integer") != NULL, "%s",
            keel_listener_last_error(f.l));
  teardown(&f);
  snprintf(sql, sizeof sql, "DROP TABLE %s", other);
  kt_pg_exec(sql);
}

Test(listen_exact, a_missing_table_is_refused_at_start) {
  fixture f;
  setup(&f, "id int PRIMARY KEY");
  exec_fmt("DROP TABLE %s", f.table);
  snprintf(f.table, sizeof f.table, "%s", "lx_no_such_table");
  new_listener(&f, "id=eq.1");
  keel_listener_start(f.l);
  uint64_t start = uv_now(&f.loop);
  while (f.errors == 0 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(f.errors, 1);
  cr_assert(strstr(keel_listener_last_error(f.l), "does not exist") != NULL, "%s",
            keel_listener_last_error(f.l));
  keel_listener_close(f.l, NULL, NULL);
  kt_loop_finish(&f.loop);
}

/* ---- item 1: values exactly as PostgreSQL prints them ---------------------- */

#define TYPE_COLUMNS 28
static const char *type_columns[TYPE_COLUMNS] = {
    "i2",  "i4", "i8",   "num", "num2", "f4", "f8", "b",  "t",  "vc",  "ch", "u",  "d",  "tm",
    "ttz", "ts", "tstz", "iv",  "by",   "jb", "ai", "at", "ab", "atz", "an", "ip", "af", "nul"};

static const char type_table_sql[] =
    "id int PRIMARY KEY, i2 smallint, i4 int, i8 bigint, num numeric, num2 numeric(10,2), "
    "f4 real, f8 double precision, b boolean, t text, vc varchar(20), ch char(5), u uuid, d date, "
    "tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval, by bytea, jb jsonb, "
    "ai int[], at text[], ab boolean[], atz timestamptz[], an numeric[], ip inet, af float8[], "
    "nul text";

typedef struct typed_seen {
  int count;
  int ids[8];
  char *values[8][TYPE_COLUMNS];
} typed_seen;

static void typed_handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  typed_seen *s = data;
  if (s->count >= 8) return;
  s->ids[s->count] = atoi(keel_change_new(c, "id"));
  for (int i = 0; i < TYPE_COLUMNS; i++) {
    const char *v = keel_change_new(c, type_columns[i]);
    s->values[s->count][i] = v != NULL ? strdup(v) : NULL;
  }
  s->count++;
}

Test(listen_exact, every_common_type_arrives_as_postgresql_prints_it) {
  fixture f;
  setup(&f, type_table_sql);
  install_plain(&f);
  new_listener(&f, NULL);
  typed_seen seen = {0};
  keel_listener_on(f.l, "h", typed_handler, &seen);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  const char *rows[] = {
      "1, 1, 2, 9007199254740993, 0.1, 19.90, 0.1, 0.1, true, 'caf\u00e9 \"q\" \\ ''s', 'x y', "
      "'ab', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2024-02-29', '10:00:00.5', '10:00:00+05:30', "
      "'2024-01-01 10:00:00.123456', '2024-01-01 10:00:00+00', '1 day 02:00:00', '\\x00ff', "
      "'{\"a\": [1, 2.50], \"b\": null}', '{1,2,NULL}', '{\"a b\",\"NULL\",\"\",NULL,\"x\\\"y\"}', "
      "'{{t,f},{t,NULL}}', '{\"2024-01-01 10:00:00+00\",\"2024-06-01 10:00:00+05:30\"}', "
      "'{1.50,NaN}', '10.0.0.1/8', '{1e-30,0.1,1e+20,-2.5}', NULL",
      "2, -32768, -2147483648, -9223372036854775808, 123456789012345678901234567890.000001, "
      "-0.00, 'NaN', '-Infinity', false, '', '', '', '00000000-0000-0000-0000-000000000000', "
      "'infinity', '00:00', '23:59:59.999999-12', '-infinity', '1900-01-01 00:00:00+05:53:28', "
      "'-1 year', '\\x', '[]', '{}', '{}', '{}', '{}', '{}', '::1', '{}', NULL",
      "3, 0, 0, 0, 'NaN', 0, 1e-30, 1e-300, NULL, 'line\nbreak\ttab', NULL, NULL, NULL, "
      "'0044-03-15 BC', NULL, NULL, '0044-03-15 10:00 BC', '0044-03-15 10:00 BC', NULL, NULL, "
      "'\"just a string\"', '{{1,2},{3,4}}', '{\"{braces}\",\"a,b\"}', NULL, NULL, "
      "'{-0.00,1e-30}', NULL, '{Infinity,NaN,123456789012345}', NULL"};
  for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
    char sql[2048];
    snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (%s)", f.table, rows[r]);
    kt_pg_exec(sql);
  }
  uint64_t start = uv_now(&f.loop);
  while (seen.count < 3 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(seen.count, 3);
  keel_listener_stats st;
  keel_listener_get_stats(f.l, &st);
  cr_assert_eq(st.malformed, 0, "no change dropped because of a value");
  for (int r = 0; r < seen.count; r++) {
    for (int i = 0; i < TYPE_COLUMNS; i++) {
      char sql[256];
      /* the type's text output (what SELECT col returns in text format);
       * booleans as true / false (col::text) */
      snprintf(sql, sizeof sql, "SELECT %s%s FROM %s WHERE id = %d", type_columns[i],
               strcmp(type_columns[i], "b") == 0 ? "::text" : "", f.table, seen.ids[r]);
      char *expected = kt_pg_scalar(sql);
      const char *got = seen.values[r][i];
      if (expected == NULL)
        cr_expect_null(got, "row %d column %s: got %s, expected NULL", seen.ids[r], type_columns[i],
                       got);
      else
        cr_expect(got != NULL && strcmp(got, expected) == 0,
                  "row %d column %s: got [%s], expected [%s]", seen.ids[r], type_columns[i],
                  got ? got : "(null)", expected);
      free(expected);
      free(seen.values[r][i]);
    }
  }
  teardown(&f);
}

/* ---- item 6: rows entering and leaving a filter ---------------------------- */

typedef struct moves {
  int count;
  keel_change_op ops[16];
  keel_change_transition how[16];
  char names[16][32];
} moves;

static void move_handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  moves *m = data;
  if (m->count >= 16) return;
  m->ops[m->count] = keel_change_operation(c);
  m->how[m->count] = keel_change_filter_transition(c);
  const char *name = keel_change_new(c, "name");
  if (name == NULL) name = keel_change_old(c, "name");
  snprintf(m->names[m->count], 32, "%s", name ? name : "(null)");
  m->count++;
}

static void leave_enter_case(bool pushed) {
  fixture f;
  setup(&f, "id int PRIMARY KEY, team_id int, name text");
  const char *filter = "team_id=eq.1";
  if (pushed) {
    char sql[16384];
    cr_assert_gt(keel_listener_install_filtered_sql(sql, sizeof sql, f.table, "id", f.channel,
                                                    KEEL_CHANGE_ALL, filter),
                 0);
    kt_pg_exec(sql);
  } else {
    install_plain(&f);
  }
  new_listener(&f, filter);
  moves m = {0};
  keel_listener_on(f.l, "h", move_handler, &m);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  exec_fmt("INSERT INTO %s VALUES (1, 1, 'a'), (2, 2, 'b')", f.table);
  exec_fmt("UPDATE %s SET name = 'a2' WHERE id = 1", f.table); /* stays in */
  exec_fmt("UPDATE %s SET team_id = 2 WHERE id = 1", f.table); /* leaves */
  exec_fmt("UPDATE %s SET name = 'a3' WHERE id = 1", f.table); /* stays out */
  exec_fmt("UPDATE %s SET team_id = 1 WHERE id = 2", f.table); /* enters */
  exec_fmt("DELETE FROM %s WHERE id = 2", f.table);            /* deleted inside */
  exec_fmt("INSERT INTO %s VALUES (9, 1, 'last')", f.table);
  uint64_t start = uv_now(&f.loop);
  while (m.count < 6 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  uv_sleep(100);
  for (int i = 0; i < 5; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  cr_assert_eq(m.count, 6);
  cr_assert(m.ops[0] == KEEL_CHANGE_INSERT && m.how[0] == KEEL_CHANGE_INSIDE);
  cr_assert_str_eq(m.names[0], "a");
  cr_assert(m.ops[1] == KEEL_CHANGE_UPDATE && m.how[1] == KEEL_CHANGE_INSIDE);
  cr_assert_str_eq(m.names[1], "a2");
  cr_assert(m.ops[2] == KEEL_CHANGE_UPDATE && m.how[2] == KEEL_CHANGE_LEAVE, "leaves");
  cr_assert_str_eq(m.names[2], "a2");
  cr_assert(m.ops[3] == KEEL_CHANGE_UPDATE && m.how[3] == KEEL_CHANGE_ENTER, "enters");
  cr_assert_str_eq(m.names[3], "b");
  cr_assert(m.ops[4] == KEEL_CHANGE_DELETE && m.how[4] == KEEL_CHANGE_INSIDE);
  cr_assert(m.ops[5] == KEEL_CHANGE_INSERT);
  cr_assert_str_eq(m.names[5], "last");
  keel_listener_stats s;
  keel_listener_get_stats(f.l, &s);
  cr_assert_eq(s.left, 1);
  cr_assert_eq(s.entered, 1);
  if (pushed) cr_assert_eq(s.received, 6, "the trigger sent only what crosses or stays inside");
  teardown(&f);
}

Test(listen_exact, updates_leaving_and_entering_the_filter_in_the_listener) {
  leave_enter_case(false);
}

Test(listen_exact, updates_leaving_and_entering_the_filter_pushed_into_the_trigger) {
  leave_enter_case(true);
}

/* ---- item 2: typed filters in a running listener ---------------------------- */

static int typed_case(const char *filter, const char *values_sql) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, name text, big bigint, u uuid, n int, amount numeric");
  install_plain(&f);
  new_listener(&f, filter);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000), "%s: %s", filter, keel_listener_last_error(f.l));
  char sql[512];
  snprintf(sql, sizeof sql, "INSERT INTO %s (name, big, u, n, amount) VALUES %s", f.table,
           values_sql);
  kt_pg_exec(sql);
  exec_fmt("INSERT INTO %s (name) VALUES ('0')", f.table); /* matches none of the filters */
  /* the marker row passes only filters on other columns; wait for the
   * listener to have read everything by waiting on received */
  keel_listener_stats s;
  uint64_t start = uv_now(&f.loop);
  int expected_received = 0;
  for (const char *p = values_sql; *p; p++) expected_received += *p == '(';
  do {
    uv_run(&f.loop, UV_RUN_NOWAIT);
    keel_listener_get_stats(f.l, &s);
  } while (s.received < (uint64_t)expected_received + 1 && uv_now(&f.loop) - start < 10000);
  int delivered = f.delivered;
  teardown(&f);
  return delivered;
}

Test(listen_exact, filters_compare_the_way_postgresql_does) {
  /* text '10' is not greater than '9' (bytes), '1' is not '1.0' */
  cr_assert_eq(typed_case("name=gt.9", "('10', 0, NULL, 0, 0)"), 0);
  cr_assert_eq(typed_case("name=eq.1.0", "('1', 0, NULL, 0, 0)"), 0);
  /* bigint beyond 2^53 */
  cr_assert_eq(typed_case("big=eq.9007199254740993", "('a', 9007199254740992, NULL, 0, 0)"), 0);
  cr_assert_eq(typed_case("big=eq.9007199254740993", "('a', 9007199254740993, NULL, 0, 0)"), 1);
  /* uuid in any case */
  cr_assert_eq(typed_case("u=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
                          "('a', 0, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 0, 0)"),
               1);
  /* blanks around integers in a list */
  cr_assert_eq(typed_case("n=in.( 1, 2, 3 )", "('a', 0, NULL, 3, 0)"), 1);
  /* exact decimals: 0.1 + 0.2 is 0.3, 19.90 = 19.9 */
  cr_assert_eq(typed_case("amount=eq.19.9", "('a', 0, NULL, 0, 19.90)"), 1);
  cr_assert_eq(typed_case("amount=gt.0.30000000000000001", "('a', 0, NULL, 0, 0.1 + 0.2)"), 0);
}

typedef struct install_result {
  bool done;
  int status;
} install_result;

static void installed_status(keel_pg *conn, int status, void *data) {
  (void)conn;
  install_result *r = data;
  r->done = true;
  r->status = status;
}

/* A filtered install the table cannot answer fails as a whole: the table's
 * triggers stay as they were. */
Test(listen_exact, a_failed_filtered_install_changes_nothing) {
  fixture f;
  setup(&f, "id serial PRIMARY KEY, n int, name text");
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = kt_pg_conninfo();
  keel_pg *conn;
  cr_assert_eq(keel_pg_new(&f.loop, &po, &conn), 0);
  install_result r = {0};
  cr_assert_eq(keel_listener_install(conn, f.table, NULL, f.channel, installed_status, &r), 0);
  while (!r.done) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(r.status, 0, "%s", keel_pg_last_error(conn));
  cr_assert_eq(trigger_count(f.table), 1);
  const char *bad[] = {"nope=eq.1", "n=eq.abc", "name=is.true", "n=in.(1,x)"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    r.done = false;
    cr_assert_eq(keel_listener_install_filtered(conn, f.table, NULL, f.channel, KEEL_CHANGE_ALL,
                                                bad[i], installed_status, &r),
                 0);
    while (!r.done) uv_run(&f.loop, UV_RUN_ONCE);
    cr_assert_eq(r.status, KEEL_EPG, "%s", bad[i]);
    cr_assert_eq(trigger_count(f.table), 1, "%s: the old trigger stays", bad[i]);
  }
  keel_pg_close(conn, NULL, NULL);
  new_listener(&f, NULL);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  exec_fmt("INSERT INTO %s (n, name) VALUES (1, 'still sent')", f.table);
  run_until_delivered(&f, 1);
  cr_assert_str_eq(f.names[0], "still sent");
  teardown(&f);
}

/* ---- item 3: oversize changes as they changed ------------------------------- */

typedef struct big_seen {
  int count;
  keel_change_op ops[8];
  char team[8][16], old_team[8][16];
  bool has_old[8], fetched[8];
  size_t big_len[8];
} big_seen;

static void big_handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  big_seen *b = data;
  if (b->count >= 8) return;
  int i = b->count++;
  b->ops[i] = keel_change_operation(c);
  const char *t = keel_change_new(c, "team");
  const char *o = keel_change_old(c, "team");
  snprintf(b->team[i], 16, "%s", t ? t : "(null)");
  snprintf(b->old_team[i], 16, "%s", o ? o : "(null)");
  b->has_old[i] = keel_change_has_old(c);
  b->fetched[i] = keel_change_was_fetched(c);
  const char *big = keel_change_new(c, "big");
  if (big == NULL) big = keel_change_old(c, "big");
  b->big_len[i] = big ? strlen(big) : 0;
}

Test(listen_exact, oversize_changes_arrive_as_they_changed_in_order) {
  fixture f;
  setup(&f, "id text PRIMARY KEY, team int, big text");
  install_plain(&f);
  new_listener(&f, "team=eq.2");
  big_seen b = {0};
  keel_listener_on(f.l, "h", big_handler, &b);
  keel_listener_start(f.l);
  cr_assert(run_until_active(&f, 10000));
  /* a 20 KB key: the writer's INSERT must not fail */
  char sql[512];
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES (repeat('k', 20000), 1, repeat('a', 20000))",
           f.table);
  kt_pg_exec(sql);
  /* back-to-back oversize updates of one row: each with its own values */
  snprintf(sql, sizeof sql,
           "UPDATE %s SET team = 2, big = repeat('b', 20001) WHERE team = 1; "
           "UPDATE %s SET team = 3, big = repeat('c', 20002) WHERE team = 2",
           f.table, f.table);
  kt_pg_exec(sql);
  /* a small change after them stays after them */
  snprintf(sql, sizeof sql, "INSERT INTO %s VALUES ('small', 2, 'x')", f.table);
  kt_pg_exec(sql);
  /* an oversize DELETE filtered on a non-key column */
  snprintf(
      sql, sizeof sql,
      "UPDATE %s SET team = 2 WHERE id <> 'small'; DELETE FROM %s WHERE team = 2 AND id <> 'small'",
      f.table, f.table);
  kt_pg_exec(sql);
  uint64_t start = uv_now(&f.loop);
  while (b.count < 5 && uv_now(&f.loop) - start < 10000) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(b.count, 5, "got %d", b.count);
  /* 1: team 1 → 2 enters, with both rows as they were */
  cr_assert_eq(b.ops[0], KEEL_CHANGE_UPDATE);
  cr_assert_str_eq(b.team[0], "2");
  cr_assert_str_eq(b.old_team[0], "1");
  cr_assert(b.has_old[0] && b.fetched[0]);
  cr_assert_eq(b.big_len[0], 20001);
  /* 2: team 2 → 3 leaves, with its own values (not the later ones) */
  cr_assert_eq(b.ops[1], KEEL_CHANGE_UPDATE);
  cr_assert_str_eq(b.team[1], "3");
  cr_assert_str_eq(b.old_team[1], "2");
  cr_assert_eq(b.big_len[1], 20002);
  /* 3: the small insert, in order */
  cr_assert_eq(b.ops[2], KEEL_CHANGE_INSERT);
  cr_assert(!b.fetched[2]);
  /* 4, 5: back into team 2, then deleted: the DELETE carries its old row */
  cr_assert_eq(b.ops[3], KEEL_CHANGE_UPDATE);
  cr_assert_eq(b.ops[4], KEEL_CHANGE_DELETE);
  cr_assert_str_eq(b.old_team[4], "2");
  cr_assert(b.has_old[4] && b.fetched[4]);
  teardown(&f);
}

/* ---- the overflow sweep --------------------------------------------------------- */

/* More old overflow rows than one sweep deletes: the sweeps follow one
 * another at the heartbeats until none is left (each one bounded, so that
 * it stays within the session's statement deadline). */
Test(listen_exact, overflow_sweep_in_bounded_steps) {
  fixture f;
  setup(&f, "id int PRIMARY KEY, name text");
  install_plain(&f);
  kt_pg_exec(
      "INSERT INTO public.keel_overflow (created, payload) SELECT now() - interval '11 minutes',"
      " 'old sweep test ' || g FROM generate_series(1, 4500) g");
  new_listener(&f, NULL);
  cr_assert_eq(keel_listener_start(f.l), 0);
  cr_assert(run_until_active(&f, 10000), "%s", keel_listener_last_error(f.l));
  uint64_t start = uv_now(&f.loop);
  int left = -1;
  while (uv_now(&f.loop) - start < 20000) {
    left = scalar_int(
        "SELECT count(*) FROM public.keel_overflow WHERE payload LIKE 'old sweep test %'");
    if (left == 0) break;
    uint64_t until = uv_now(&f.loop) + 200;
    while (uv_now(&f.loop) < until) uv_run(&f.loop, UV_RUN_ONCE);
  }
  cr_assert_eq(left, 0, "old overflow rows left: %d", left);
  teardown(&f);
}
