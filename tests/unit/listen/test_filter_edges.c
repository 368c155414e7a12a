/* Filter edges the main filter tests leave out: in.() lists with escapes
 * and their limits, typed comparison of dates and times with every offset
 * form (and text that is no time: unknown, so no match), the comparison
 * class of every type oid, and the WHEN-clause text of the IS operators. */
#include <criterion/criterion.h>
#include <string.h>

#include "listen/filter.h"
#include "support/harness.h"

static const char *one_value;

static const char *lookup_one(void *data, const char *column, bool *present) {
  (void)data;
  *present = strcmp(column, "c") == 0;
  return *present ? one_value : NULL;
}

static bool match_typed(const char *filter, keel__cmp cmp, const char *value) {
  keel__filter f;
  char why[160];
  cr_assert_eq(keel__filter_parse(&f, filter, why, sizeof why), 0, "%s: %s", filter, why);
  for (size_t i = 0; i < f.count; i++)
    cr_assert_eq(keel__filter_set_typed(&f.terms[i], cmp, (const char *const *)f.terms[i].values),
                 0);
  one_value = value;
  bool m = keel__filter_match(&f, lookup_one, NULL);
  keel__filter_free(&f);
  return m;
}

Test(filter_edges, in_lists) {
  cr_assert(match_typed("c=in.(\"a\\\"b\",\"x,y\")", KEEL__CMP_TEXT, "a\"b"));
  cr_assert(match_typed("c=in.(\"a\\\"b\",\"x,y\")", KEEL__CMP_TEXT, "x,y"));
  cr_assert_not(match_typed("c=in.()", KEEL__CMP_TEXT, "a"), "the empty list matches nothing");
  static const struct {
    const char *filter;
    const char *reason;
  } bad[] = {
      {"c=in.a,b", "a list must look like"},
      {"c=in.(\"abc)", "unterminated quote"},
      {"c=in.(\"a\"b)", "text after a quoted value"},
      {"c=in.(,a)", "an empty value"},
      {"c=in.(a,)", "an empty value after a comma"},
      {"c=in.(a\"b)", "unexpected quote or parenthesis"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    keel__filter f;
    char why[160] = "";
    cr_assert_eq(keel__filter_parse(&f, bad[i].filter, why, sizeof why), UV_EINVAL, "%s",
                 bad[i].filter);
    cr_assert(strstr(why, bad[i].reason) != NULL, "%s: want \"%s\" in \"%s\"", bad[i].filter,
              bad[i].reason, why);
    cr_assert_eq(keel__filter_parse(&f, bad[i].filter, NULL, 0), UV_EINVAL, "why may be NULL");
  }
  /* a value over 1 KiB, quoted or not */
  static char longf[1400], longq[1400];
  memcpy(longf, "c=in.(", 6);
  memset(longf + 6, 'v', 1100);
  memcpy(longf + 1106, ")", 2);
  memcpy(longq, "c=in.(\"", 7);
  memset(longq + 7, 'v', 1100);
  memcpy(longq + 1107, "\")", 3);
  const char *longs[] = {longf, longq};
  for (int i = 0; i < 2; i++) {
    keel__filter f;
    char why[160] = "";
    cr_assert_eq(keel__filter_parse(&f, longs[i], why, sizeof why), UV_EINVAL);
    cr_assert(strstr(why, "too long") != NULL, "%s", why);
  }
}

Test(filter_edges, times_with_every_offset_form) {
  const keel__cmp tz = KEEL__CMP_TIMESTAMPTZ;
  cr_assert(match_typed("c=eq.2024-01-01 00:00:00+00", tz, "2024-01-01 05:30:00+05:30"));
  cr_assert(match_typed("c=eq.2024-01-01 00:00:00+00", tz, "2024-01-01 05:30:15+05:30:15"));
  cr_assert(match_typed("c=eq.2024-01-01 00:00:00+00", tz, "2023-12-31 19:00:00-05"));
  cr_assert(match_typed("c=lt.2024-01-01 00:00:00.5+00", tz, "2024-01-01 00:00:00.25+00"));
  cr_assert(match_typed("c=gt.2024-01-01 00:00:00+00", tz, "infinity"));
  cr_assert(match_typed("c=lt.2024-01-01 00:00:00+00", tz, "-infinity"));
  cr_assert(match_typed("c=lt.0001-01-01", KEEL__CMP_DATE, "0044-03-15 BC"));
  cr_assert(match_typed("c=gte.2024-02-29", KEEL__CMP_DATE, "2024-02-29"));
  cr_assert(match_typed("c=lte.2024-02-29 23:59:59", KEEL__CMP_TIMESTAMP, "2024-02-29 10:00:00"));
  /* not a time in PostgreSQL's output form: unknown, so neither the term
   * nor its negation matches */
  const char *not_times[] = {"24-01-01",           "2024/01/01",          "2024-1-01",
                             "2024-01-01 1:00:00", "2024-01-01 10:00",    "2024-01-01 10:00:00+5",
                             "2024-01-01 x",       "2024-01-01 10:00:00Z"};
  for (size_t i = 0; i < sizeof not_times / sizeof not_times[0]; i++) {
    cr_assert_not(match_typed("c=eq.2024-01-01", tz, not_times[i]), "%s", not_times[i]);
    cr_assert_not(match_typed("c=not.eq.2024-01-01", tz, not_times[i]), "%s", not_times[i]);
  }
  cr_assert_not(match_typed("c=eq.2024-01-01", tz, NULL), "NULL is unknown");
  cr_assert(match_typed("c=is.null", tz, NULL));
}

Test(filter_edges, comparison_class_of_every_type) {
  static const struct {
    unsigned oid;
    keel__cmp cmp;
  } types[] = {{20, KEEL__CMP_NUMERIC}, {21, KEEL__CMP_NUMERIC},     {23, KEEL__CMP_NUMERIC},
               {26, KEEL__CMP_NUMERIC}, {1700, KEEL__CMP_NUMERIC},   {700, KEEL__CMP_FLOAT4},
               {701, KEEL__CMP_FLOAT8}, {16, KEEL__CMP_BOOL},        {25, KEEL__CMP_TEXT},
               {1043, KEEL__CMP_TEXT},  {19, KEEL__CMP_TEXT},        {1042, KEEL__CMP_BPCHAR},
               {1082, KEEL__CMP_DATE},  {1114, KEEL__CMP_TIMESTAMP}, {1184, KEEL__CMP_TIMESTAMPTZ},
               {2950, KEEL__CMP_UUID},  {1186, KEEL__CMP_INTERVAL},  {3802, KEEL__CMP_CANONICAL},
               {0, KEEL__CMP_CANONICAL}};
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
    cr_assert_eq(keel__filter_cmp_of(types[i].oid), types[i].cmp, "oid %u", types[i].oid);
  cr_assert_not(keel__filter_op_supported(KEEL__F_LT, KEEL__CMP_CANONICAL), "no order known");
  cr_assert(keel__filter_op_supported(KEEL__F_EQ, KEEL__CMP_CANONICAL));
  cr_assert(keel__filter_op_supported(KEEL__F_GTE, KEEL__CMP_UUID));
  cr_assert(match_typed("c=eq.abc  ", KEEL__CMP_BPCHAR, "abc"), "char(n) ignores trailing blanks");
  cr_assert(match_typed("c=lt.abd", KEEL__CMP_BPCHAR, "abc "));
  cr_assert(match_typed("c=gt.ab", KEEL__CMP_BPCHAR, "abc"));
}

Test(filter_edges, is_operators_in_sql) {
  keel__filter f;
  char why[160], sql[512];
  cr_assert_eq(
      keel__filter_parse(&f, "a=is.null&b=not.is.null&c=is.true&d=is.false&e=is.unknown&g=in.()",
                         why, sizeof why),
      0, "%s", why);
  int n = keel__filter_to_sql(&f, "NEW", sql, sizeof sql);
  cr_assert_gt(n, 0);
  cr_assert(strstr(sql, "NEW.\"a\" IS NULL") != NULL, "%s", sql);
  cr_assert(strstr(sql, "(NOT (NEW.\"b\" IS NULL))") != NULL, "%s", sql);
  cr_assert(strstr(sql, "NEW.\"c\" IS TRUE") != NULL, "%s", sql);
  cr_assert(strstr(sql, "NEW.\"d\" IS FALSE") != NULL, "%s", sql);
  cr_assert(strstr(sql, "NEW.\"e\" IS UNKNOWN") != NULL, "%s", sql);
  cr_assert(strstr(sql, "FALSE") != NULL, "in.() is FALSE");
  for (int cap = 0; cap <= n; cap++)
    cr_assert_eq(keel__filter_to_sql(&f, "NEW", cap ? sql : NULL, (size_t)cap), UV_ENOBUFS,
                 "cap %d", cap);
  cr_assert_eq(keel__filter_to_sql(&f, "NEW", sql, (size_t)n + 1), n);
  keel__filter_free(&f);
}

/* Issue 12: intervals compare as PostgreSQL compares them ('1 day' =
 * '24:00:00', a month is 30 days), whichever IntervalStyle the writer's
 * session printed them in (postgres, postgres_verbose, iso_8601). */
Test(filter_edges, intervals_by_value_in_every_output_style) {
  const keel__cmp iv = KEEL__CMP_INTERVAL;
  static const char *one_day_and_a_half_second[] = {
      "1 day 00:00:00.5", "24:00:00.5", "@ 1 day 0.5 secs", "@ 24 hours 0.5 secs",
      "P1DT0.5S",         "PT24H0.5S",  "PT86400.5S",       "2 days -23:59:59.5"};
  for (size_t i = 0; i < sizeof one_day_and_a_half_second / sizeof one_day_and_a_half_second[0];
       i++) {
    const char *v = one_day_and_a_half_second[i];
    cr_assert(match_typed("c=eq.1 day 00:00:00.5", iv, v), "%s", v);
    cr_assert(match_typed("c=gt.1 day", iv, v), "%s", v);
    cr_assert(match_typed("c=lt.1 day 00:00:01", iv, v), "%s", v);
    cr_assert_not(match_typed("c=neq.24:00:00.5", iv, v), "%s", v);
  }
  cr_assert(match_typed("c=eq.30 days", iv, "1 mon"));
  cr_assert(match_typed("c=eq.1 year", iv, "360 days"));
  cr_assert(match_typed("c=eq.1 year", iv, "P1Y"));
  cr_assert(match_typed("c=eq.-1 days +02:00:00", iv, "-22:00:00"));
  cr_assert(match_typed("c=eq.-1 days +02:00:00", iv, "@ 22 hours ago"));
  cr_assert(match_typed("c=eq.-1 days +02:00:00", iv, "P-1DT2H"));
  cr_assert(match_typed("c=eq.00:00:00", iv, "@ 0"));
  cr_assert(match_typed("c=eq.00:00:00", iv, "PT0S"));
  cr_assert(match_typed("c=lt.00:00:00", iv, "-00:00:00.000001"));
  cr_assert(match_typed("c=gt.-1 mons", iv, "-29 days"));
  cr_assert(match_typed("c=in.(1 day,2 days)", iv, "48:00:00"));
  cr_assert_not(match_typed("c=eq.1 day", iv, "1 day 00:00:00.000001"));
  /* sql_standard output is not read: it compares as text */
  cr_assert(match_typed("c=eq.1 2:00:00", iv, "1 2:00:00"));
  cr_assert_not(match_typed("c=eq.1 day 02:00:00", iv, "1 2:00:00"));
}
