/* keel/integrity.h — placeholder until the module lands. */
#ifndef KEEL_INTEGRITY_H
#define KEEL_INTEGRITY_H
#include "keel/common.h"
#endif
