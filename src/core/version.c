#include "keel/common.h"

unsigned keel_version(void) {
  return KEEL_VERSION_HEX;
}

const char *keel_version_string(void) {
  return KEEL_VERSION_STRING;
}
