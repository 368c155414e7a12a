/* keel/breaker.h — placeholder until the module lands. */
#ifndef KEEL_BREAKER_H
#define KEEL_BREAKER_H
#include "keel/common.h"
#endif
