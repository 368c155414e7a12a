/* The integrity module's pure helpers at their edges: slugify with every
 * UTF-8 length (valid and broken) and its refusals; SQLSTATE classes,
 * mapping and the retry classifier for every input kind. */
#include <criterion/criterion.h>
#include <string.h>

#include "keel/integrity.h"

static const char *slug(const char *name, size_t max_len) {
  static char out[128];
  int n = keel_slugify(name, max_len, out, sizeof out);
  cr_assert_gt(n, 0, "%s", name);
  cr_assert_eq((size_t)n, strlen(out));
  return out;
}

Test(pure_edges, slugify_every_utf8_length) {
  cr_assert_str_eq(slug("a\xf0\x9f\x98\x80"
                        "b",
                        60),
                   "a-b", "4-byte: another script, a break");
  cr_assert_str_eq(slug("a\xe2\x82\xac"
                        "b",
                        60),
                   "a-b", "3-byte");
  cr_assert_str_eq(slug("\xc5\x93uvre \xc5\x81\xc3\xb3"
                        "d\xc5\xba",
                        60),
                   "oeuvre-lodz");
  cr_assert_str_eq(slug("a\xf0\x9f\x98"
                        "b",
                        60),
                   "a-b", "a cut 4-byte sequence is dropped");
  cr_assert_str_eq(slug("a\xe2\x82"
                        "b",
                        60),
                   "a-b", "a cut 3-byte sequence");
  cr_assert_str_eq(slug("a\xc3"
                        "b",
                        60),
                   "a-b", "a cut 2-byte sequence");
  cr_assert_str_eq(slug("a\xff\xfe"
                        "b",
                        60),
                   "a-b", "bytes that start nothing");
  cr_assert_str_eq(slug("\xf0\x9f\x98\x80", 60), "item", "nothing left");
  cr_assert_str_eq(slug("!!!", 2), "it", "the fallback is cut to max_len");
  cr_assert_str_eq(slug("abcdefghij", 4), "abcd", "one long word is cut inside");
  cr_assert_str_eq(slug("ab cd efgh", 7), "ab-cd", "cut at the last word boundary");
  char out[8] = "xxxxxxx";
  cr_assert_eq(keel_slugify(NULL, 4, out, sizeof out), UV_EINVAL);
  cr_assert_eq(keel_slugify("a", 4, NULL, sizeof out), UV_EINVAL);
  cr_assert_eq(keel_slugify("a", 0, out, sizeof out), UV_EINVAL);
  cr_assert_eq(keel_slugify("a", 8, out, sizeof out), UV_ENOBUFS, "cap must exceed max_len");
  cr_assert_str_eq(out, "xxxxxxx", "untouched on error");
}

Test(pure_edges, sqlstate_inputs) {
  cr_assert_eq(keel_sqlstate_classify(NULL), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_classify("0000"), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_classify("000000"), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_classify("00000"), KEEL_SQLSTATE_NONE);
  cr_assert_eq(keel_sqlstate_classify("57P01"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_classify("57P02"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_classify("57P03"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_classify("57P04"), KEEL_SQLSTATE_OTHER);
  cr_assert_eq(keel_sqlstate_classify("08006"), KEEL_SQLSTATE_CONNECTION);
  cr_assert_eq(keel_sqlstate_error("57P03"), KEEL_ECONN);
  cr_assert_eq(keel_sqlstate_error(NULL), 0);
  cr_assert_str_eq(keel_sqlstate_class_name((keel_sqlstate_class)99), "unknown");
  cr_assert_str_eq(keel_sqlstate_class_name(KEEL_SQLSTATE_IN_DOUBT), "in_doubt");

  /* map: only KEEL_EPG is looked at; without a result it stays KEEL_EPG */
  cr_assert_eq(keel_sqlstate_map(KEEL_EPG, NULL), KEEL_EPG);
  cr_assert_eq(keel_sqlstate_map(KEEL_ECONN, NULL), KEEL_ECONN);
  cr_assert_eq(keel_sqlstate_map(0, NULL), 0);

  bool yes = true, no = false;
  cr_assert_eq(keel_integrity_retryable(KEEL_EUNIQUE, NULL), 0);
  cr_assert_eq(keel_integrity_retryable(KEEL_EUNIQUE, &no), 0);
  cr_assert_neq(keel_integrity_retryable(KEEL_EUNIQUE, &yes), 0);
  cr_assert_neq(keel_integrity_retryable(KEEL_ESERIALIZATION, NULL), 0);
  cr_assert_neq(keel_integrity_retryable(KEEL_ERETRYABLE, NULL), 0);
  cr_assert_neq(keel_integrity_retryable(KEEL_ECONN, NULL), 0);
  cr_assert_neq(keel_integrity_retryable(UV_ETIMEDOUT, NULL), 0);
  cr_assert_eq(keel_integrity_retryable(KEEL_EINDOUBT, &yes), 0);
  cr_assert_eq(keel_integrity_retryable(KEEL_EPG, NULL), 0);
  cr_assert_eq(keel_integrity_retryable(UV_ECANCELED, NULL), 0);
  cr_assert_eq(keel_integrity_retryable(0, NULL), 0);
}
