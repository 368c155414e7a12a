#include "core/util.h"

#include <stdio.h>

int keel__fail(char *errbuf, int err, const char *fmt, ...) {
  if (errbuf != NULL) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(errbuf, KEEL__ERRBUF_SIZE, fmt, args);
    va_end(args);
  }
  return err;
}
