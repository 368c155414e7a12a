/* keel/listen.h — placeholder until the module lands. */
#ifndef KEEL_LISTEN_H
#define KEEL_LISTEN_H
#include "keel/common.h"
#endif
