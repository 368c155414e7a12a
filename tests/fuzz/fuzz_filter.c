/* Fuzz target: the PostgREST filter parser, evaluator and its translation
 * into a trigger's WHEN condition. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "listen/filter.h"

static const char *lookup(void *row, const char *column, bool *present) {
  (void)row;
  *present = column[0] != 'x';
  return column[0] == 'n' ? NULL : "42";
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  if (text == NULL) return 0;
  memcpy(text, data, size);
  text[size] = '\0';
  keel__filter f;
  char why[128];
  if (keel__filter_parse(&f, text, why, sizeof why) == 0) {
    keel__filter_match(&f, lookup, NULL);
    char sql[4096];
    int n = keel__filter_to_sql(&f, "NEW", sql, sizeof sql);
    if (n >= 0 && (size_t)n != strlen(sql)) abort();
    keel__filter_free(&f);
  }
  free(text);
  return 0;
}
