/* keel/verify.h — placeholder until the module lands. */
#ifndef KEEL_VERIFY_H
#define KEEL_VERIFY_H
#include "keel/common.h"
#endif
