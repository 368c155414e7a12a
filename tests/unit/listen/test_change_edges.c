/* Edges of the change payload reader that the main payload tests leave
 * out: NULL handling of every accessor, rows wider than the inline field
 * array (and that growth failing), fetched and overflow rows, JSON escapes
 * and numbers at their limits, and each malformed form with its reason. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "listen/change.h"
#include "support/harness.h"

#define HEAD "{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1"

Test(change_edges, accessors_accept_null) {
  cr_assert_eq(keel_change_operation(NULL), 0);
  cr_assert_null(keel_change_operation_name(NULL));
  cr_assert_null(keel_change_schema(NULL));
  cr_assert_null(keel_change_table(NULL));
  cr_assert_null(keel_change_new(NULL, "a"));
  cr_assert_null(keel_change_old(NULL, "a"));
  cr_assert_not(keel_change_has_new(NULL));
  cr_assert_not(keel_change_has_old(NULL));
  cr_assert_null(keel_change_key(NULL, "a"));
  cr_assert_null(keel_change_json(NULL));
  cr_assert_not(keel_change_was_fetched(NULL));
  cr_assert_eq(keel_change_filter_transition(NULL), KEEL_CHANGE_INSIDE);
  cr_assert_eq(keel_change_time_us(NULL), 0);
  cr_assert_eq(keel_change_latency_us(NULL), 0);

  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, HEAD ",\"old\":null}", why, sizeof why), 0, "%s", why);
  cr_assert_null(keel_change_new(&c, NULL), "a NULL column name finds nothing");
  cr_assert_null(keel_change_new(&c, "a"), "no new row");
  cr_assert_null(keel_change_key(&c, "a"), "no key");
  cr_assert_not(keel_change_has_old(&c), "\"old\": null is no old row");
  keel__change_free(&c);

  /* a NULL payload is malformed, with or without a buffer for the reason */
  cr_assert_eq(keel__change_parse(&c, NULL, why, sizeof why), KEEL_EPROTO);
  cr_assert(strstr(why, "empty") != NULL, "%s", why);
  keel__change_free(&c);
  cr_assert_eq(keel__change_parse(&c, "{", NULL, 0), KEEL_EPROTO);
  keel__change_free(&c);
  char work[4] = "{}";
  cr_assert_eq(keel__change_parse_in(&c, NULL, work, why, sizeof why), KEEL_EPROTO);
  cr_assert_eq(keel__change_parse_in(&c, "{}", NULL, why, sizeof why), KEEL_EPROTO);
  keel__change_free(&c);
}

/* A row of n columns c0..c(n-1) with values 0..n-1. */
static char *wide_payload(int n) {
  size_t cap = 128 + (size_t)n * 24;
  char *p = malloc(cap);
  cr_assert_not_null(p);
  size_t at = (size_t)snprintf(p, cap, HEAD ",\"pk\":{\"c0\":0},\"new\":{");
  for (int i = 0; i < n; i++)
    at += (size_t)snprintf(p + at, cap - at, "%s\"c%d\":%d", i ? "," : "", i, i);
  snprintf(p + at, cap - at, "}}");
  return p;
}

Test(change_edges, rows_wider_than_the_inline_fields) {
  int n = KEEL__CHANGE_INLINE_FIELDS * 3; /* grows twice: inline -> heap -> realloc */
  char *p = wide_payload(n);
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, p, why, sizeof why), 0, "%s", why);
  for (int i = 0; i < n; i++) {
    char name[16], value[16];
    snprintf(name, sizeof name, "c%d", i);
    snprintf(value, sizeof value, "%d", i);
    cr_assert_str_eq(keel_change_new(&c, name), value);
  }
  cr_assert_str_eq(keel_change_key(&c, "c0"), "0");
  keel__change_free(&c);
  free(p);
}

static void parse_wide(void *arg) {
  const char *p = arg;
  keel_change c;
  char why[128] = "";
  int rc = keel__change_parse(&c, p, why, sizeof why);
  if (kt_failmalloc_index() < 0) {
    cr_assert_eq(rc, 0, "%s", why);
  } else {
    cr_assert(rc == 0 || rc == UV_ENOMEM, "rc %d (%s)", rc, why);
  }
  if (rc == 0) cr_assert_str_eq(keel_change_new(&c, "c100"), "100");
  keel__change_free(&c);
}

Test(change_edges, field_growth_failing_is_enomem) {
  char *p = wide_payload(KEEL__CHANGE_INLINE_FIELDS * 3);
  kt_failmalloc_run(parse_wide, p);
  cr_assert_geq(kt_failmalloc_count(), 3, "the copy, the ends and two growths allocate");
  free(p);
}

static char *kdup(const char *s) {
  char *d = keel__malloc(strlen(s) + 1);
  cr_assert_not_null(d);
  memcpy(d, s, strlen(s) + 1);
  return d;
}

Test(change_edges, fetched_rows) {
  keel_change c;
  char why[128];
  /* key-only UPDATE: the row is fetched and replaces the new row */
  cr_assert_eq(keel__change_parse(&c,
                                  "{\"op\":\"UPDATE\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,"
                                  "\"pk\":{\"id\":3},\"key_only\":true}",
                                  why, sizeof why),
               0, "%s", why);
  cr_assert_not(keel_change_was_fetched(&c));
  cr_assert_eq(keel__change_set_fetched(&c, kdup(" {\"id\":3,\"name\":\"n\"} ")), 0);
  cr_assert(keel_change_was_fetched(&c));
  cr_assert_str_eq(keel_change_new(&c, "name"), "n");
  /* a second fetch replaces the first */
  cr_assert_eq(keel__change_set_fetched(&c, kdup("{\"id\":3,\"name\":\"m\"}")), 0);
  cr_assert_str_eq(keel_change_new(&c, "name"), "m");
  /* not an object, or text after it: refused, the row stays */
  cr_assert_eq(keel__change_set_fetched(&c, kdup("[1]")), KEEL_EPROTO);
  cr_assert_eq(keel__change_set_fetched(&c, kdup("{\"id\":3} x")), KEEL_EPROTO);
  cr_assert_eq(keel__change_set_fetched(&c, kdup("{\"id\":}")), KEEL_EPROTO);
  cr_assert_str_eq(keel_change_new(&c, "name"), "m");
  keel__change_free(&c);

  /* a DELETE's fetched row is the old row */
  cr_assert_eq(keel__change_parse(&c,
                                  "{\"op\":\"DELETE\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,"
                                  "\"pk\":{\"id\":3},\"key_only\":true}",
                                  why, sizeof why),
               0, "%s", why);
  cr_assert_eq(keel__change_set_fetched(&c, kdup("{\"id\":3,\"name\":\"gone\"}")), 0);
  cr_assert_str_eq(keel_change_old(&c, "name"), "gone");
  cr_assert_null(keel_change_new(&c, "name"));
  keel__change_free(&c);
}

static void fetch_scenario(void *arg) {
  (void)arg;
  keel_change c;
  char why[128];
  int rc = keel__change_parse(&c,
                              "{\"op\":\"UPDATE\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1,"
                              "\"pk\":{\"id\":3},\"key_only\":true}",
                              why, sizeof why);
  if (rc == 0) {
    char *row = keel__malloc(32);
    if (row != NULL) {
      snprintf(row, 32, "{\"id\":3,\"name\":\"n\"}");
      rc = keel__change_set_fetched(&c, row);
      if (rc == 0)
        cr_assert_str_eq(keel_change_new(&c, "name"), "n");
      else
        cr_assert_eq(rc, UV_ENOMEM);
    }
  } else {
    cr_assert_eq(rc, UV_ENOMEM);
  }
  keel__change_free(&c);
}

Test(change_edges, fetched_row_allocation_failure) {
  kt_failmalloc_run(fetch_scenario, NULL);
}

Test(change_edges, overflow_rows) {
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, HEAD ",\"overflow\":42,\"pk\":{\"id\":1}}", why, sizeof why),
               0, "%s", why);
  cr_assert_eq(c.overflow_id, 42);
  cr_assert_eq(keel__change_set_overflow(&c, kdup(HEAD ",\"new\":{\"id\":1,\"big\":\"x\"}}"), why,
                                         sizeof why),
               0, "%s", why);
  cr_assert_str_eq(keel_change_new(&c, "big"), "x");
  cr_assert(keel_change_was_fetched(&c));
  /* an overflow row that points to another overflow row is refused */
  cr_assert_eq(keel__change_set_overflow(&c, kdup(HEAD ",\"overflow\":7}"), why, sizeof why),
               KEEL_EPROTO);
  cr_assert(strstr(why, "points to another") != NULL, "%s", why);
  cr_assert_not(keel_change_was_fetched(&c));
  keel__change_free(&c);
  const char *bad_ids[] = {HEAD ",\"overflow\":0}", HEAD ",\"overflow\":-3}",
                           HEAD ",\"overflow\":99999999999999999999}", HEAD ",\"overflow\":\"7\"}"};
  for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++) {
    cr_assert_eq(keel__change_parse(&c, bad_ids[i], why, sizeof why), KEEL_EPROTO, "%s",
                 bad_ids[i]);
    cr_assert(strstr(why, "overflow") != NULL, "%s: %s", bad_ids[i], why);
    keel__change_free(&c);
  }
}

/* The listener's oversize path: the row's text parsed in place in one copy,
 * keel_change_json borrowing the result's text until keel__change_own_raw. */
Test(change_edges, overflow_rows_in_place) {
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c, HEAD ",\"overflow\":42}", why, sizeof why), 0, "%s", why);
  char raw[] = HEAD ",\"new\":{\"id\":1,\"big\":\"a \\\"quoted\\\" value, longer than sixteen\"}}";
  cr_assert_eq(keel__change_set_overflow_in(&c, raw, kdup(raw), why, sizeof why), 0, "%s", why);
  cr_assert(keel_change_was_fetched(&c));
  cr_assert_str_eq(keel_change_new(&c, "big"), "a \"quoted\" value, longer than sixteen");
  cr_assert_eq(keel_change_json(&c), raw, "borrowed, not copied");
  cr_assert_eq(keel__change_own_raw(&c), 0);
  cr_assert_neq(keel_change_json(&c), raw);
  cr_assert_eq(keel__change_own_raw(&c), 0, "owning twice is a no-op");
  memset(raw, 'x', sizeof raw - 1); /* the result is gone */
  cr_assert_str_eq(keel_change_json(&c), HEAD
                   ",\"new\":{\"id\":1,\"big\":\"a \\\"quoted\\\" value, longer than sixteen\"}}");
  cr_assert_str_eq(keel_change_new(&c, "big"), "a \"quoted\" value, longer than sixteen");
  /* pointing to another overflow row: refused, the copy freed with c */
  char again[] = HEAD ",\"overflow\":7}";
  cr_assert_eq(keel__change_set_overflow_in(&c, again, kdup(again), why, sizeof why), KEEL_EPROTO);
  cr_assert_not(keel_change_was_fetched(&c));
  keel__change_free(&c);
}

static void own_raw_scenario(void *arg) {
  (void)arg;
  keel_change c;
  memset(&c, 0, sizeof c); /* freeable */
  char why[128];
  static const char raw[] = HEAD ",\"new\":{\"id\":1}}";
  char *work = keel__malloc(sizeof raw);
  if (work == NULL) return;
  memcpy(work, raw, sizeof raw);
  if (keel__change_set_overflow_in(&c, raw, work, why, sizeof why) == 0) {
    int rc = keel__change_own_raw(&c);
    cr_assert(rc == 0 || rc == UV_ENOMEM);
    cr_assert_str_eq(keel_change_json(&c), raw);
    cr_assert(rc != 0 ? keel_change_json(&c) == raw : keel_change_json(&c) != raw);
  }
  keel__change_free(&c);
}

Test(change_edges, own_raw_allocation_failure) {
  kt_failmalloc_run(own_raw_scenario, NULL);
}

/* Strings are scanned 16 bytes at a time while 16 remain: an escape, a
 * quote or a control character at every offset, and strings ending just
 * before, at and after a 16-byte step and the end of the text. */
Test(change_edges, string_scan_every_offset) {
  for (size_t len = 0; len < 70; len++) {
    for (size_t at = 0; at <= len; at++) {
      char value[80], expect[80], json[256];
      memset(value, 'v', len);
      value[len] = '\0';
      memcpy(expect, value, len + 1);
      if (at < len) {
        /* an escaped quote at `at`: two bytes in JSON, one decoded */
        memcpy(value + at, "\\\"", 2);
        memset(value + at + 2, 'w', len - at);
        value[len + 2 > sizeof value - 1 ? sizeof value - 1 : len + 2] = '\0';
        expect[at] = '"';
        memset(expect + at + 1, 'w', len - at);
        expect[len + 1] = '\0';
      }
      snprintf(json, sizeof json, HEAD ",\"new\":{\"c\":\"%s\"}}", value);
      keel_change c;
      char why[128];
      cr_assert_eq(keel__change_parse(&c, json, why, sizeof why), 0, "%s: %s", json, why);
      cr_assert_str_eq(keel_change_new(&c, "c"), expect, "%s", json);
      keel__change_free(&c);
      /* a raw control character at `at` is refused wherever it is */
      if (at < len) {
        memset(value, 'v', len);
        value[len] = '\0';
        value[at] = '\t';
        snprintf(json, sizeof json, HEAD ",\"new\":{\"c\":\"%s\"}}", value);
        cr_assert_eq(keel__change_parse(&c, json, why, sizeof why), KEEL_EPROTO, "%zu/%zu", len,
                     at);
        keel__change_free(&c);
      }
    }
  }
}

Test(change_edges, escapes_and_numbers) {
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c,
                                  HEAD ",\"new\":{\"a\":\"\\u00C9\\u00e9\\b\\f\\n\\r\\t\","
                                       "\"b\":\"\\u07FF\\u0800\",\"c\":-12.5e3,\"d\":0.0E-2,"
                                       "\"e\":1E+2,\"f\":[true,false,null,{\"x\":[]}],"
                                       "\"g\":\t\r\n {\"y\" : 1}}}",
                                  why, sizeof why),
               0, "%s", why);
  cr_assert_str_eq(keel_change_new(&c, "a"), "\xc3\x89\xc3\xa9\b\f\n\r\t");
  cr_assert_str_eq(keel_change_new(&c, "b"), "\xdf\xbf\xe0\xa0\x80");
  cr_assert_str_eq(keel_change_new(&c, "c"), "-12.5e3");
  cr_assert_str_eq(keel_change_new(&c, "d"), "0.0E-2");
  cr_assert_str_eq(keel_change_new(&c, "e"), "1E+2");
  cr_assert_str_eq(keel_change_new(&c, "f"), "[true,false,null,{\"x\":[]}]");
  cr_assert_str_eq(keel_change_new(&c, "g"), "{\"y\" : 1}");
  keel__change_free(&c);
}

Test(change_edges, every_malformed_form_has_a_reason) {
  static const struct {
    const char *json;
    const char *reason;
  } bad[] = {
      {HEAD ",\"new\":{\"a\":\"\\uZZ00\"}}", "bad \\u escape"},
      {HEAD ",\"new\":{\"a\":\"\\u00G0\"}}", "bad \\u escape"},
      {HEAD ",\"new\":{\"a\":\"\\udc00\"}}", "unpaired surrogate"},
      {HEAD ",\"new\":{\"a\":\"\\ud800\\u0041\"}}", "unpaired surrogate"},
      {HEAD ",\"new\":{\"a\":\"\\ud800x\"}}", "unpaired surrogate"},
      {HEAD ",\"new\":{\"a\":\"\\q\"}}", "bad escape in a string"},
      {HEAD ",\"new\":{\"a\":\"\x01\"}}", "control character"},
      {HEAD ",\"new\":{\"a\":\"abc", "unterminated string"},
      {HEAD ",\"new\":{\"a\":1.}}", "bad number"},
      {HEAD ",\"new\":{\"a\":1e}}", "bad number"},
      {HEAD ",\"new\":{\"a\":1e+}}", "bad number"},
      {HEAD ",\"new\":{\"a\":-}}", "bad number"},
      {HEAD ",\"new\":{\"a\":tru}}", "bad literal"},
      {HEAD ",\"new\":{\"a\":nul}}", "bad literal"},
      {HEAD ",\"new\":{\"a\":{1:2}}}", "expected a member name"},
      {HEAD ",\"new\":{\"a\":{\"k\" 2}}}", "expected ':'"},
      {HEAD ",\"new\":{\"a\":{\"k\":2 3}}}", ""},
      {HEAD ",\"new\":{\"a\":[1 2]}}", ""},
      {HEAD ",\"new\":{5:1}}", "expected a column name"},
      {HEAD ",\"new\":{\"a\" 1}}", "expected ':'"},
      {HEAD ",\"new\":{\"a\":1 \"b\":2}}", ""},
      {HEAD ",\"new\":{\"a\":1}", ""},
      {HEAD " \"x\":1}", "expected ',' or '}'"},
      {HEAD ",\"pk\":5}", "\"pk\" is not an object"},
      {HEAD ",\"pk\":null}", "\"pk\" is not an object"},
      {HEAD ",\"old\":[1]}", "\"old\" is not an object"},
      {HEAD ",\"ts_us\":2}", "twice"},
      {"{\"op\":\"INSERT\",\"schema\":5,\"table\":\"t\",\"ts_us\":1}",
       "no \"schema\" or \"table\""},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":\"1\"}",
       "no integer \"ts_us\""},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1e3}",
       "no integer \"ts_us\""},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1E3}",
       "no integer \"ts_us\""},
      {"{\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}", "no \"op\""},
      {"{\"op\":\"UPDATE\",\"schema\":\"s\",\"ts_us\":1}", "no \"schema\" or \"table\""},
      {HEAD ",\"key_only\":true}", "key-only"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    keel_change c;
    char why[160] = "";
    cr_assert_eq(keel__change_parse(&c, bad[i].json, why, sizeof why), KEEL_EPROTO, "%s",
                 bad[i].json);
    cr_assert(strstr(why, "malformed change payload") != NULL, "%s: %s", bad[i].json, why);
    cr_assert(strstr(why, bad[i].reason) != NULL, "%s: want \"%s\" in \"%s\"", bad[i].json,
              bad[i].reason, why);
    keel__change_free(&c);
  }
}

Test(change_edges, nesting_is_bounded) {
  char p[512];
  size_t at = (size_t)snprintf(p, sizeof p, HEAD ",\"new\":{\"a\":");
  for (int i = 0; i < KEEL__CHANGE_MAX_DEPTH + 2; i++) p[at++] = '[';
  for (int i = 0; i < KEEL__CHANGE_MAX_DEPTH + 2; i++) p[at++] = ']';
  snprintf(p + at, sizeof p - at, "}}");
  keel_change c;
  char why[160] = "";
  cr_assert_eq(keel__change_parse(&c, p, why, sizeof why), KEEL_EPROTO);
  cr_assert(strstr(why, "nested too deeply") != NULL, "%s", why);
  keel__change_free(&c);
}

/* The reader's fast paths (listen CPU work): plain bytes before and after
 * an escape, member names that share a first byte with keel's own, and
 * ts_us read by a bounded digit loop with strtoll's old range rules. */
Test(change_edges, fast_paths_keep_their_answers) {
  keel_change c;
  char why[128];
  cr_assert_eq(keel__change_parse(&c,
                                  "{\"o\":1,\"ol\":2,\"opx\":3,\"t\":4,\"tsx\":5,\"overflowx\":6,"
                                  "\"s\":7,\"newx\":8,\"k\":9,\"op\":\"UPDATE\",\"schema\":\"s\","
                                  "\"table\":\"t\",\"ts_us\":-0,\"new\":{\"name\":"
                                  "\"plain \\\"quoted\\\" \\u00e9nd\",\"p\":\"abc\\\\\"}}",
                                  why, sizeof why),
               0, "%s", why);
  cr_assert_eq(keel_change_operation(&c), KEEL_CHANGE_UPDATE);
  cr_assert_eq(keel_change_time_us(&c), 0);
  cr_assert_eq(c.overflow_id, 0);
  cr_assert_str_eq(keel_change_new(&c, "name"), "plain \"quoted\" \xc3\xa9nd");
  cr_assert_str_eq(keel_change_new(&c, "p"), "abc\\");
  keel__change_free(&c);
  cr_assert_eq(keel__change_parse(&c, HEAD "}", why, sizeof why), 0, "%s", why);
  keel__change_free(&c);
  const char *edges[][2] = {
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":253402300799999999}", NULL},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":253402300800000000}",
       "out of range"},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":99999999999999999999999}",
       "out of range"},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":-1}", "out of range"},
      {"{\"op\":\"INSERT\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1.0}", "no integer"},
      {"{\"op\":\"INSERTX\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}", "not INSERT"},
      {"{\"op\":\"INSER\",\"schema\":\"s\",\"table\":\"t\",\"ts_us\":1}", "not INSERT"},
      {HEAD ",\"overflow\":9223372036854775807}", NULL},
      {HEAD ",\"overflow\":9223372036854775808}", "out of range"},
      {HEAD ",\"overflow\":-0}", "out of range"},
      {HEAD ",\"overflow\":1.5}", "out of range"},
  };
  for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++) {
    int rc = keel__change_parse(&c, edges[i][0], why, sizeof why);
    if (edges[i][1] == NULL) {
      cr_assert_eq(rc, 0, "%s: %s", edges[i][0], why);
    } else {
      cr_assert_eq(rc, KEEL_EPROTO, "%s", edges[i][0]);
      cr_assert(strstr(why, edges[i][1]) != NULL, "%s: %s", edges[i][0], why);
    }
    keel__change_free(&c);
  }
}
