/* Fuzz target: the change payload reader, column access, and the text forms
 * of timestamps, floats, json and arrays. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "listen/change.h"

static keel__column columns[] = {
    {"id", "timestamp with time zone", 1184, KEEL__FORM_TIMESTAMPTZ, KEEL__FORM_AS_IS, false, false,
     ','},
    {"name", "jsonb", 3802, KEEL__FORM_JSON, KEEL__FORM_AS_IS, false, false, ','},
    {"tags", "timestamp[]", 1115, KEEL__FORM_ARRAY, KEEL__FORM_TIMESTAMP, false, false, ','},
    {"score", "double precision", 701, KEEL__FORM_FLOAT8, KEEL__FORM_AS_IS, false, false, ','},
    {"flags", "boolean[]", 1000, KEEL__FORM_ARRAY, KEEL__FORM_FLOAT4, true, false, ';'},
};
static keel__columns table = {columns, sizeof columns / sizeof columns[0], false};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  if (text == NULL) return 0;
  memcpy(text, data, size);
  text[size] = '\0';
  keel_change c;
  char why[128];
  if (keel__change_parse(&c, text, why, sizeof why) == 0) {
    keel_change_new(&c, "id");
    keel_change_old(&c, "name");
    keel_change_key(&c, "id");
    c.columns = &table;
    for (size_t i = 0; i < table.count; i++) {
      keel_change_new(&c, columns[i].name);
      keel_change_old(&c, columns[i].name);
      keel_change_new(&c, columns[i].name); /* cached */
    }
    keel_change_operation_name(&c);
  }
  keel__change_free(&c);
  free(text);
  return 0;
}
