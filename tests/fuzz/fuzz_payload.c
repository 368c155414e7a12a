/* Fuzz target: the change payload parser and column access. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "listen/change.h"

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
    keel_change_new(&c, "tags");
    keel_change_old(&c, "score");
    keel_change_operation_name(&c);
  }
  keel__change_free(&c);
  free(text);
  return 0;
}
