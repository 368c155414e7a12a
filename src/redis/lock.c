/* Distributed locks with fencing tokens (in progress). */
#include "redis/redis_internal.h"

struct keel_redis_lock {
  keel__rlink link; /* first: the client's list of locks */
};

void keel__redis_lock_client_closing(struct keel_redis_lock *lock) {
  (void)lock;
}

void keel__redis_lock_client_closed(struct keel_redis_lock *lock) {
  (void)lock;
}
