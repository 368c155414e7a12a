/* Integrity cores without I/O: slugify and the SQLSTATE classifier. */
#include <criterion/criterion.h>
#include <string.h>

#include "keel/integrity.h"

static const char *slug(const char *name, size_t max_len) {
  static char out[256];
  int rc = keel_slugify(name, max_len, out, sizeof out);
  cr_assert_geq(rc, 0, "%s", name);
  cr_assert_eq((size_t)rc, strlen(out));
  return out;
}

Test(slugify, table_of_inputs) {
  cr_assert_str_eq(slug("Hello World", 60), "hello-world");
  cr_assert_str_eq(slug("  Crème Brûlée  ", 60), "creme-brulee");
  cr_assert_str_eq(slug("Straße Æsir Œuvre Łódź", 60), "strasse-aesir-oeuvre-lodz");
  cr_assert_str_eq(slug("", 60), "item", "never empty");
  cr_assert_str_eq(slug("!!! ### ???", 60), "item", "only symbols");
  cr_assert_str_eq(slug("Robert'); DROP TABLE cards;--", 60), "robert-drop-table-cards");
  cr_assert_str_eq(slug("a--b__c..d", 60), "a-b-c-d");
  cr_assert_str_eq(slug("日本語 text", 60), "text", "other scripts are dropped");
  cr_assert_str_eq(slug("\xff\xfe broken \xc3", 60), "broken", "invalid UTF-8 is dropped");
  cr_assert_str_eq(slug("The quick brown fox jumps", 16), "the-quick-brown", "cut at a word");
  cr_assert_str_eq(slug("Supercalifragilistic", 8), "supercal", "one long word is cut");
  char long_name[5000];
  memset(long_name, 'x', sizeof long_name - 1);
  long_name[sizeof long_name - 1] = '\0';
  cr_assert_eq(strlen(slug(long_name, 60)), 60);
  char out[8];
  cr_assert_eq(keel_slugify("abc", 60, out, sizeof out), UV_ENOBUFS);
  cr_assert_eq(keel_slugify(NULL, 60, out, sizeof out), UV_EINVAL);
  cr_assert_eq(keel_slugify("abc", 0, out, sizeof out), UV_EINVAL);
}

Test(sqlstate, classes) {
  cr_assert_eq(keel_sqlstate_classify("40001"), KEEL_SQLSTATE_RETRY_TX);
  cr_assert_eq(keel_sqlstate_classify("40P01"), KEEL_SQLSTATE_RETRY_TX);
  cr_assert_eq(keel_sqlstate_classify("55P03"), KEEL_SQLSTATE_RETRY);
  cr_assert_eq(keel_sqlstate_classify("08006"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_classify("57P01"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_classify("23505"), KEEL_SQLSTATE_UNIQUE);
  cr_assert_eq(keel_sqlstate_classify("23503"), KEEL_SQLSTATE_CONSTRAINT);
  cr_assert_eq(keel_sqlstate_classify("23514"), KEEL_SQLSTATE_CONSTRAINT);
  cr_assert_eq(keel_sqlstate_classify("23502"), KEEL_SQLSTATE_CONSTRAINT);
  cr_assert_eq(keel_sqlstate_classify("22012"), KEEL_SQLSTATE_OTHER);
  cr_assert_eq(keel_sqlstate_classify(NULL), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_classify("abc"), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_error("40001"), KEEL_ESERIALIZATION);
  cr_assert_eq(keel_sqlstate_error("23505"), KEEL_EUNIQUE);
  cr_assert_eq(keel_sqlstate_error("08003"), KEEL_ECONN);
  cr_assert_eq(keel_sqlstate_error("55P03"), KEEL_ERETRYABLE);
  cr_assert_eq(keel_sqlstate_error("23503"), KEEL_EPG);
  cr_assert_eq(keel_sqlstate_error(NULL), 0);
  bool unique_ok = true;
  cr_assert(keel_integrity_retryable(KEEL_ESERIALIZATION, NULL));
  cr_assert(keel_integrity_retryable(KEEL_ECONN, NULL));
  cr_assert(!keel_integrity_retryable(KEEL_EUNIQUE, NULL));
  cr_assert(keel_integrity_retryable(KEEL_EUNIQUE, &unique_ok));
  cr_assert(!keel_integrity_retryable(KEEL_EPG, NULL));
  cr_assert_str_eq(keel_sqlstate_class_name(KEEL_SQLSTATE_UNIQUE), "unique");
}

/* Issue 14: 08007 (transaction resolution unknown) is in doubt, not a
 * retryable connection loss; KEEL_EINDOUBT is never retried by default. */
Test(sqlstate, transaction_resolution_unknown_is_in_doubt) {
  cr_assert_eq(keel_sqlstate_classify("08007"), KEEL_SQLSTATE_IN_DOUBT);
  cr_assert_eq(keel_sqlstate_error("08007"), KEEL_EINDOUBT);
  cr_assert_eq(keel_sqlstate_classify("08006"), KEEL_SQLSTATE_CONNECTION);
  cr_assert(!keel_integrity_retryable(KEEL_EINDOUBT, NULL));
  bool unique_ok = true;
  cr_assert(!keel_integrity_retryable(KEEL_EINDOUBT, &unique_ok));
  cr_assert(keel_integrity_retryable(KEEL_ECONN, NULL));
  cr_assert_str_eq(keel_sqlstate_class_name(KEEL_SQLSTATE_IN_DOUBT), "in_doubt");
  cr_assert_str_eq(keel_sqlstate_class_name(KEEL_SQLSTATE_CLASS_COUNT), "unknown");
}

Test(integrity_opts, opts_init_zeroes_reserved_space) {
  keel_integrity_opts o;
  memset(&o, 0xab, sizeof o);
  keel_integrity_opts_init(&o);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_assert_eq(o.reserved_[i], 0);
  cr_assert_null(o.idempotency_table);
  cr_assert_eq(o.slug_max_attempts, 5);
  keel_integrity_opts_init(NULL);
}
