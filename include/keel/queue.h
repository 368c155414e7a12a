/* keel/queue.h — placeholder until the module lands. */
#ifndef KEEL_QUEUE_H
#define KEEL_QUEUE_H
#include "keel/common.h"
#endif
