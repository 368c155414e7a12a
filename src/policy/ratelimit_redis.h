/* Internal: the shared limiter's Lua script, for the benchmark's floor. */
#ifndef KEEL_POLICY_RATELIMIT_REDIS_H
#define KEEL_POLICY_RATELIMIT_REDIS_H

const char *keel__ratelimit_redis_script(void);

#endif
