/* The Redis store (waits for the Redis client of keel/redis.h). */
#include "idem/idem_internal.h"

int keel__idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                         keel_idem **out);

int keel_idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                        keel_idem **out) {
  (void)loop;
  (void)redis;
  (void)opts;
  (void)out;
  return UV_ENOSYS;
}

int keel__idem_redis_start(idem_op *op) {
  (void)op;
  return UV_ENOSYS;
}
