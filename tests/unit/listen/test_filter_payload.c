/* The listener's cores without I/O: filter parser/evaluator and payload
 * parser. */
#include <criterion/criterion.h>
#include <string.h>

#include "listen/change.h"
#include "listen/filter.h"
#include "support/harness.h"

typedef struct row {
  const char *names[8];
  const char *values[8];
} row;

static const char *lookup(void *data, const char *column, bool *present) {
  row *r = data;
  for (int i = 0; i < 8 && r->names[i] != NULL; i++) {
    if (strcmp(r->names[i], column) == 0) {
      *present = true;
      return r->values[i];
    }
  }
  *present = false;
  return NULL;
}

static bool matches(const char *filter, row *r) {
  keel__filter f;
  char why[128];
  cr_assert_eq(keel__filter_parse(&f, filter, why, sizeof why), 0, "%s: %s", filter, why);
  bool result = keel__filter_match(&f, lookup, r);
  keel__filter_free(&f);
  return result;
}

Test(filter, every_operator) {
  row r = {{"team_id", "status", "score", "name", "done", "gone", "flag"},
           {"123", "active", "9.5", "a,b", "true", NULL, "false"}};
  cr_assert(matches("team_id=eq.123", &r));
  cr_assert(matches("team_id=eq.123.0", &r), "numbers compare as numbers");
  cr_assert(!matches("team_id=eq.12", &r));
  cr_assert(matches("team_id=neq.12", &r));
  cr_assert(matches("score=lt.10", &r), "9.5 < 10 numerically, not as text");
  cr_assert(!matches("score=lt.9", &r));
  cr_assert(matches("score=lte.9.5", &r));
  cr_assert(matches("score=gt.9", &r));
  cr_assert(matches("score=gte.9.5", &r));
  cr_assert(!matches("score=gte.10", &r));
  cr_assert(matches("status=in.(paused,active)", &r));
  cr_assert(!matches("status=in.(paused,stopped)", &r));
  cr_assert(matches("name=in.(\"a,b\",c)", &r), "quoted values keep commas");
  cr_assert(matches("gone=is.null", &r));
  cr_assert(!matches("status=is.null", &r));
  cr_assert(matches("done=is.true", &r));
  cr_assert(matches("flag=is.false", &r));
  cr_assert(!matches("gone=eq.x", &r), "NULL never equals");
  cr_assert(!matches("missing=eq.1", &r));
  cr_assert(matches("team_id=eq.123&status=eq.active&score=gt.1", &r));
  cr_assert(!matches("team_id=eq.123&status=eq.paused", &r));
  cr_assert(matches("", &r), "empty filter matches everything");
  cr_assert(matches("status=gt.abc", &r), "text compares as text");
}

Test(filter, quoted_empty_values_are_values) {
  row r = {{"s", NULL}, {"", NULL}};
  cr_assert(matches("s=in.(\"\",x)", &r));
  cr_assert(!matches("s=in.(x,\"y\")", &r));
}

Test(filter, malformed_filters_are_rejected) {
  const char *bad[] = {"team_id",        "team_id=123",   "team_id=like.1", "=eq.1",
                       "a=eq.1&",        "a=in.(1,2",     "a=not.in",       "a=is.maybe",
                       "a=in.(\"x)",     "a=in.(1,)",     "a=eq.1&&b=eq.2", "a=.1",
                       "a=verylongop.1", "a=in.(\"x\"y)", "a=in.(a,,b)",    "a=in.(,a)",
                       "a=in.(a,b,)",    "a=in.(,)"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    keel__filter f;
    char why[128] = "";
    cr_assert_eq(keel__filter_parse(&f, bad[i], why, sizeof why), UV_EINVAL, "%s", bad[i]);
    cr_assert_str_neq(why, "", "a reason for %s", bad[i]);
  }
}

Test(payload, parses_keel_format) {
  const char *json =
      "{\"op\":\"UPDATE\",\"schema\":\"public\",\"table\":\"projects\",\"ts_us\":1700000000000000,"
      "\"pk\":{\"id\":7},\"new\":{\"id\":7,\"name\":\"x\",\"n\":null,\"ok\":true,\"tags\":[1,2]},"
      "\"old\":{\"id\":7,\"name\":\"y\"}}";
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, json, why, sizeof why), 0, "%s", why);
  cr_assert_eq(keel_change_operation(&c), KEEL_CHANGE_UPDATE);
  cr_assert_str_eq(keel_change_operation_name(&c), "UPDATE");
  cr_assert_str_eq(keel_change_table(&c), "projects");
  cr_assert_str_eq(keel_change_schema(&c), "public");
  cr_assert_str_eq(keel_change_new(&c, "name"), "x");
  cr_assert_str_eq(keel_change_old(&c, "name"), "y");
  cr_assert_str_eq(keel_change_new(&c, "id"), "7");
  cr_assert_null(keel_change_new(&c, "n"));
  cr_assert_str_eq(keel_change_new(&c, "ok"), "true");
  cr_assert_str_eq(keel_change_new(&c, "tags"), "[1,2]");
  cr_assert_null(keel_change_new(&c, "missing"));
  cr_assert_str_eq(keel_change_key(&c, "id"), "7");
  cr_assert_eq(keel_change_time_us(&c), 1700000000000000);
  cr_assert_str_eq(keel_change_json(&c), json);
  cr_assert(keel_change_has_new(&c) && keel_change_has_old(&c));
  keel__change_free(&c);
}

/* Issue 12 #1: values keep the text they were sent with; nothing goes
 * through a double, and no value makes a change malformed. */
Test(payload, values_are_exact) {
  const char *json =
      "{\"op\":\"INSERT\",\"schema\":\"public\",\"table\":\"t\",\"ts_us\":1,\"pk\":{\"id\":"
      "123456789012345678901234567890},\"new\":{\"a\": 0.1, \"b\": 19.90, \"c\": "
      "123456789012345678901234567890, \"d\": -0, \"e\": 1e-30, \"f\": \"NaN\", \"g\": "
      "9007199254740993, \"h\": \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\/\", \"i\": {\"k\": "
      "[1, "
      "2.50, {\"x\": \"\\u0041\"}]}, \"j\": [], \"k\": {}, \"l\": false, \"m\": null, \"n\": "
      "\"\", \"o\": -1.5E+300}}";
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, json, why, sizeof why), 0, "%s", why);
  cr_assert_str_eq(keel_change_key(&c, "id"), "123456789012345678901234567890");
  cr_assert_str_eq(keel_change_new(&c, "a"), "0.1");
  cr_assert_str_eq(keel_change_new(&c, "b"), "19.90");
  cr_assert_str_eq(keel_change_new(&c, "c"), "123456789012345678901234567890");
  cr_assert_str_eq(keel_change_new(&c, "d"), "-0");
  cr_assert_str_eq(keel_change_new(&c, "e"), "1e-30");
  cr_assert_str_eq(keel_change_new(&c, "f"), "NaN");
  cr_assert_str_eq(keel_change_new(&c, "g"), "9007199254740993");
  cr_assert_str_eq(keel_change_new(&c, "h"), "caf\xc3\xa9 \xf0\x9f\x98\x80 \"q\" \\ /");
  cr_assert_str_eq(keel_change_new(&c, "i"), "{\"k\": [1, 2.50, {\"x\": \"\\u0041\"}]}",
                   "nested JSON as sent");
  cr_assert_str_eq(keel_change_new(&c, "j"), "[]");
  cr_assert_str_eq(keel_change_new(&c, "k"), "{}");
  cr_assert_str_eq(keel_change_new(&c, "l"), "false");
  cr_assert_null(keel_change_new(&c, "m"));
  cr_assert_str_eq(keel_change_new(&c, "n"), "");
  cr_assert_str_eq(keel_change_new(&c, "o"), "-1.5E+300");
  cr_assert_str_eq(keel_change_json(&c), json, "the raw payload is untouched");
  keel__change_free(&c);
}

Test(payload, malformed_payloads_are_reported) {
  const char *bad[] = {
      "", "not json", "[]", "{}",
      "{\"op\":\"TRUNCATE\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}",
      "{\"op\":\"INSERT\",\"table\":\"t\",\"ts_us\":1}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\"}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"new\":5}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"key_only\":true}",
      "{\"op\":1,\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1.5}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"new\":{\"a\":01}}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"new\":{\"a\":\"\\u0000\"}"
      "}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"new\":{\"a\":\"\\ud800\"}"
      "}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,\"new\":{\"a\":[1,}}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1} x",
      "{\"op\":\"INSERT\",\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}",
      /* issue 12 #9: forged times (any database user can NOTIFY) */
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":-9223372036854775808}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":-1}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":9223372036854775807}",
      "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":253402300800000000}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    keel_change c;
    char why[128] = "";
    cr_assert_eq(keel__change_parse(&c, bad[i], why, sizeof why), KEEL_EPROTO, "%s", bad[i]);
    cr_assert_str_neq(why, "");
    keel__change_free(&c);
  }
}

Test(filter, translates_into_a_when_condition) {
  keel__filter f;
  char why[128], sql[8192];
  cr_assert_eq(keel__filter_parse(&f, "na'me=eq.it's&flag=is.true&gone=is.null", why, sizeof why),
               0);
  int n = keel__filter_to_sql(&f, "NEW", sql, sizeof sql);
  cr_assert_gt(n, 0);
  cr_assert_eq((size_t)n, strlen(sql));
  cr_assert_str_eq(sql,
                   "((NEW.\"na'me\" = E'it''s')) AND ((NEW.\"flag\" IS TRUE)) AND "
                   "((NEW.\"gone\" IS NULL))");
  cr_assert_eq(keel__filter_to_sql(&f, "NEW", sql, 20), UV_ENOBUFS);
  keel__filter_free(&f);

  cr_assert_eq(
      keel__filter_parse(&f, "team_id=gt.12&s=in.(a,\"b)\")&qx=not.eq.1&e=in.()", why, sizeof why),
      0);
  n = keel__filter_to_sql(&f, "OLD", sql, sizeof sql);
  cr_assert_gt(n, 0);
  cr_assert(strstr(sql, "ELSE OLD.\"team_id\" > E'12' END") != NULL, "%s", sql);
  cr_assert(strstr(sql, "OLD.\"team_id\"::text COLLATE \"C\" > E'12'") != NULL, "%s", sql);
  cr_assert(strstr(sql, "OLD.\"s\" IN (E'a', E'b)')") != NULL, "%s", sql);
  cr_assert(strstr(sql, "(NOT (OLD.\"qx\" = E'1'))") != NULL, "%s", sql);
  cr_assert(strstr(sql, "((FALSE))") != NULL, "in.() matches nothing: %s", sql);
  keel__filter_free(&f);

  /* issue 12 #8: a backslash cannot end the literal early when the server
   * runs with standard_conforming_strings = off */
  cr_assert_eq(keel__filter_parse(&f, "n=eq.a\\');DROP TABLE x;--", why, sizeof why), 0);
  n = keel__filter_to_sql(&f, "NEW", sql, sizeof sql);
  cr_assert_gt(n, 0);
  cr_assert(strstr(sql, "= E'a\\\\'');DROP TABLE x;--'") != NULL, "%s", sql);
  keel__filter_free(&f);

  cr_assert_eq(keel__filter_parse(&f, NULL, why, sizeof why), 0);
  cr_assert_eq(keel__filter_to_sql(&f, "NEW", sql, sizeof sql), 0);
  cr_assert_str_eq(sql, "");
}

/* PostgREST forms: not., is.not_null, is.unknown, isdistinct, in.(),
 * case-insensitive is. values. */
Test(filter, postgrest_forms) {
  row r = {{"a", "n", "b", NULL}, {"5", NULL, "true", NULL}};
  cr_assert(matches("a=not.eq.4", &r));
  cr_assert(!matches("a=not.eq.5", &r));
  cr_assert(!matches("n=not.eq.5", &r), "NOT (NULL = 5) is not true");
  cr_assert(matches("n=not.is.not_null", &r));
  cr_assert(matches("a=is.not_null", &r));
  cr_assert(matches("n=is.NULL", &r));
  cr_assert(matches("b=is.TRUE", &r));
  cr_assert(matches("n=is.unknown", &r));
  cr_assert(matches("n=isdistinct.5", &r), "NULL is distinct from 5");
  cr_assert(!matches("a=isdistinct.5", &r));
  cr_assert(!matches("a=in.()", &r));
  cr_assert(!matches("n=in.()", &r));
  cr_assert(matches("a=not.in.()", &r));
}

/* A payload of `columns` number columns c0..c<columns-1> (value i) and a
 * text column of `body` bytes, into buf. */
static void wide_payload(char *buf, size_t cap, int columns, size_t body) {
  size_t n = (size_t)snprintf(buf, cap,
                              "{\"op\":\"INSERT\",\"schema\":\"public\",\"table\":\"t\","
                              "\"ts_us\":1,\"pk\":{\"id\":7},\"new\":{\"id\":7,\"price\":12.50");
  for (int i = 0; i < columns; i++) n += (size_t)snprintf(buf + n, cap - n, ",\"c%d\":%d", i, i);
  n += (size_t)snprintf(buf + n, cap - n, ",\"body\":\"");
  memset(buf + n, 'x', body);
  n += body;
  snprintf(buf + n, cap - n, "\"},\"old\":null}");
}

/* The parser allocates nothing sized by the payload: parsing a change in
 * place (the listener's path) makes no allocation for a 20 KB row, where it
 * used to calloc len/2 pointers (80 KB zeroed) per change. */
Test(payload, parse_in_place_allocates_nothing_for_a_large_row) {
  static char json[32768], work[32768];
  wide_payload(json, sizeof json, 3, 20000);
  memcpy(work, json, strlen(json) + 1);
  kt_alloc_install();
  kt_alloc_fail_after(-1);
  keel_change c;
  char why[128];
  uint64_t before = kt_alloc_count();
  cr_assert_eq(keel__change_parse_in(&c, json, work, why, sizeof why), 0, "%s", why);
  cr_assert_eq(kt_alloc_count() - before, 0);
  cr_assert_str_eq(keel_change_new(&c, "price"), "12.50");
  cr_assert_str_eq(keel_change_new(&c, "c2"), "2");
  cr_assert_eq(strlen(keel_change_new(&c, "body")), 20000);
  keel__change_free(&c);
}

/* More number columns than the parser keeps on its stack (64): every value
 * is still cut exactly where it ends. */
Test(payload, many_number_columns_are_exact) {
  static char json[32768];
  wide_payload(json, sizeof json, 300, 10);
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, json, why, sizeof why), 0, "%s", why);
  char name[16], value[16];
  for (int i = 0; i < 300; i++) {
    snprintf(name, sizeof name, "c%d", i);
    snprintf(value, sizeof value, "%d", i);
    cr_assert_str_eq(keel_change_new(&c, name), value, "%s", name);
  }
  cr_assert_str_eq(keel_change_new(&c, "price"), "12.50");
  cr_assert_str_eq(keel_change_new(&c, "body"), "xxxxxxxxxx");
  keel__change_free(&c);
}

/* Allocation failure is an input: fail the i-th allocation for every i of
 * parsing a filter, translating it, parsing a payload and formatting its
 * columns, and writing the install SQL. Each run ends cleanly, leaks nothing. */
static int alloc_scenario(void) {
  keel__filter f;
  char why[128], sql[4096];
  int rc = keel__filter_parse(&f, "team_id=eq.123&s=in.(a,\"b,c\",d)&n=is.null", why, sizeof why);
  if (rc != 0) return rc;
  rc = keel__filter_to_sql(&f, "NEW", sql, sizeof sql);
  keel__filter_free(&f);
  if (rc < 0) return rc;
  keel_change c;
  rc = keel__change_parse(&c,
                          "{\"op\":\"UPDATE\",\"schema\":\"public\",\"table\":\"t\",\"ts_us\":1,"
                          "\"pk\":{\"id\":7},\"new\":{\"id\":7,\"tags\":[1,2],\"x\":1.5},"
                          "\"old\":{\"id\":6}}",
                          why, sizeof why);
  if (rc == 0) {
    if (keel_change_new(&c, "id") == NULL || keel_change_new(&c, "tags") == NULL ||
        keel_change_new(&c, "x") == NULL || keel_change_key(&c, "id") == NULL)
      rc = UV_ENOMEM;
  }
  keel__change_free(&c);
  if (rc != 0) return rc;
  /* past the parser's 64 value ends on the stack: the list grows */
  static char wide[8192];
  wide_payload(wide, sizeof wide, 150, 4);
  rc = keel__change_parse(&c, wide, why, sizeof why);
  if (rc == 0 && keel_change_new(&c, "c149") == NULL) rc = UV_ENOMEM;
  keel__change_free(&c);
  if (rc != 0) return rc;
  static char buf[16384];
  rc = keel_listener_install_filtered_sql(buf, sizeof buf, "public.t", "id", NULL, KEEL_CHANGE_ALL,
                                          "a=eq.1");
  return rc < 0 ? rc : 0;
}

Test(alloc, every_allocation_failure_is_clean) {
  kt_alloc_install();
  kt_alloc_fail_after(-1);
  uint64_t before = kt_alloc_count();
  cr_assert_eq(alloc_scenario(), 0);
  uint64_t total = kt_alloc_count() - before;
  cr_assert_gt(total, 3);
  cr_assert_eq(kt_alloc_live_blocks(), 0);
  for (uint64_t i = 0; i < total; i++) {
    kt_alloc_fail_after((int64_t)i);
    int rc = alloc_scenario();
    kt_alloc_fail_after(-1);
    cr_assert_eq(rc, UV_ENOMEM, "failing allocation %llu gave %d", (unsigned long long)i, rc);
    cr_assert_eq(kt_alloc_live_blocks(), 0, "leak after failing allocation %llu",
                 (unsigned long long)i);
  }
}
