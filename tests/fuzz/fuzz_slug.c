/* Fuzz target: slugify never overflows, never returns an empty slug, and
 * only emits [a-z0-9-]. */
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
  char out[64];
  size_t max_len = size > 0 ? 1 + data[0] % 60 : 60;
  int len = keel_slugify(text, max_len, out, sizeof out);
  if (len <= 0 || (size_t)len > max_len || strlen(out) != (size_t)len) abort();
  for (int i = 0; i < len; i++)
    if (!((out[i] >= 'a' && out[i] <= 'z') || (out[i] >= '0' && out[i] <= '9') || out[i] == '-'))
      abort();
  free(text);
  return 0;
}
