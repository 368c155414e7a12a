/* Fuzz target: the SQLSTATE classifier accepts any string. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keel/integrity.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1);
  if (text == NULL) return 0;
  memcpy(text, data, size);
  text[size] = '\0';
  keel_sqlstate_class cls = keel_sqlstate_classify(text);
  int err = keel_sqlstate_error(text);
  if ((cls == KEEL_SQLSTATE_NONE) != (err == 0)) abort();
  keel_sqlstate_class_name(cls);
  free(text);
  return 0;
}
