/* A value's JSON form (to_jsonb) turned into its text form (col::text),
 * as handlers see it for typed columns: timestamps, floats, json strings
 * and arrays (with array_out's quoting), each at its edges, and every
 * shape that is not the expected one refused (then delivered as sent). */
#include <criterion/criterion.h>
#include <string.h>

#include "listen/change.h"
#include "support/harness.h"

static keel__column column(keel__form form, keel__form element) {
  keel__column c;
  memset(&c, 0, sizeof c);
  c.name = "c";
  c.form = form;
  c.element = element;
  c.delim = ',';
  return c;
}

static void expect(const keel__column *col, const char *json, const char *want) {
  char out[256];
  cr_assert(keel__to_text_form(col, json, out, sizeof out), "%s refused", json);
  cr_assert_str_eq(out, want, "%s", json);
}

static void refused(const keel__column *col, const char *json) {
  char out[256];
  cr_assert_not(keel__to_text_form(col, json, out, sizeof out), "%s accepted", json);
}

Test(text_form, refusals) {
  keel__column ts = column(KEEL__FORM_TIMESTAMP, KEEL__FORM_AS_IS);
  char out[8];
  cr_assert_not(keel__to_text_form(NULL, "x", out, sizeof out));
  cr_assert_not(keel__to_text_form(&ts, NULL, out, sizeof out));
  cr_assert_not(keel__to_text_form(&ts, "x", NULL, sizeof out));
  cr_assert_not(keel__to_text_form(&ts, "x", out, 0));
  keel__column as_is = column(KEEL__FORM_AS_IS, KEEL__FORM_AS_IS);
  refused(&as_is, "1");
}

Test(text_form, timestamps) {
  keel__column ts = column(KEEL__FORM_TIMESTAMP, KEEL__FORM_AS_IS);
  keel__column tz = column(KEEL__FORM_TIMESTAMPTZ, KEEL__FORM_AS_IS);
  expect(&ts, "2024-01-01T10:00:00", "2024-01-01 10:00:00");
  expect(&ts, "infinity", "infinity");
  expect(&tz, "-infinity", "-infinity");
  expect(&tz, "2024-01-01T10:00:00+00:00", "2024-01-01 10:00:00+00");
  expect(&tz, "2024-01-01T10:00:00.5-05:00", "2024-01-01 10:00:00.5-05");
  expect(&tz, "2024-01-01T10:00:00+05:30", "2024-01-01 10:00:00+05:30");
  expect(&tz, "0044-03-15T10:00:00+00:00 BC", "0044-03-15 10:00:00+00 BC");
  refused(&ts, "2024-01-01 10:00:00");
  refused(&ts, "24-1-1T10:00");
  refused(&tz, "2024-01-01T10:00:00");
  char small[8];
  cr_assert_not(keel__to_text_form(&ts, "2024-01-01T10:00:00", small, sizeof small));
}

Test(text_form, floats) {
  keel__column f8 = column(KEEL__FORM_FLOAT8, KEEL__FORM_AS_IS);
  keel__column f4 = column(KEEL__FORM_FLOAT4, KEEL__FORM_AS_IS);
  expect(&f8, "0.00001", "1e-05");
  expect(&f8, "0.0001", "0.0001");
  expect(&f8, "123.5", "123.5");
  expect(&f8, "100000", "100000");
  expect(&f8, "1000000000000000", "1e+15");
  expect(&f8, "123456789012345", "123456789012345");
  expect(&f8, "-12.50", "-12.5");
  expect(&f8, "0.000", "0");
  expect(&f8, "-0", "-0");
  expect(&f4, "1000000", "1e+06");
  expect(&f4, "123456", "123456");
  expect(&f4, "1234567.5", "1.2345675e+06");
  refused(&f8, "1.2.3");
  refused(&f8, "1e5");
  refused(&f8, "");
  refused(&f8, "-");
}

Test(text_form, arrays) {
  keel__column a = column(KEEL__FORM_ARRAY, KEEL__FORM_AS_IS);
  expect(&a, "[1, 2, 3]", "{1,2,3}");
  expect(&a, " [] ", "{}");
  expect(&a, "[[1, 2], [3, 4]]", "{{1,2},{3,4}}");
  expect(&a, "[null, \"NULL\", \"null\", \"\"]", "{NULL,\"NULL\",\"null\",\"\"}");
  expect(&a, "[\"a b\", \"x,y\", \"{}\", \"q\\\"\", \"b\\\\s\", \"\\t\"]",
         "{\"a b\",\"x,y\",\"{}\",\"q\\\"\",\"b\\\\s\",\"\t\"}");
  expect(&a, "[true, false]", "{true,false}");
  a.element_bool = true;
  expect(&a, "[true, false]", "{t,f}");
  a.element_bool = false;
  a.delim = ';';
  expect(&a, "[\"a;b\", \"c,d\"]", "{\"a;b\";c,d}");
  a.delim = ',';
  keel__column ta = column(KEEL__FORM_ARRAY, KEEL__FORM_TIMESTAMPTZ);
  expect(&ta, "[\"2024-01-01T10:00:00+00:00\"]", "{\"2024-01-01 10:00:00+00\"}");
  keel__column fa = column(KEEL__FORM_ARRAY, KEEL__FORM_FLOAT8);
  expect(&fa, "[0.00001, 2.50]", "{1e-05,2.5}");
  keel__column ja = column(KEEL__FORM_ARRAY, KEEL__FORM_AS_IS);
  ja.element_json = true;
  expect(&ja, "[{\"k\": 1}, [1, 2]]", "{\"{\\\"k\\\": 1}\",\"[1, 2]\"}");
  refused(&a, "{\"a\": 1}");
  refused(&a, "[1, 2");
  refused(&a, "[1, 2] x");
  refused(&a, "[1 2]");
  char small[6];
  cr_assert_not(keel__to_text_form(&a, "[1, 2, 3, 4]", small, sizeof small), "too small");
  /* nesting beyond the limit is refused */
  char deep[256];
  size_t n = 0;
  for (int i = 0; i < KEEL__CHANGE_MAX_DEPTH + 2; i++) deep[n++] = '[';
  for (int i = 0; i < KEEL__CHANGE_MAX_DEPTH + 2; i++) deep[n++] = ']';
  deep[n] = '\0';
  refused(&a, deep);
}
