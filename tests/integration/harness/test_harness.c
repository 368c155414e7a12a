/* Proves the harness: the PostgreSQL and Redis that scripts/test started are
 * reachable. Fails (never skips) when they are not. */
#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "keel/common.h"
#include "support/harness.h"

Test(harness, postgresql_is_reachable) {
  char *answer = kt_pg_scalar("SELECT 40 + 2");
  cr_assert_not_null(answer);
  cr_assert_str_eq(answer, "42");
  free(answer);
  char *version = kt_pg_scalar("SHOW server_version_num");
  cr_assert_not_null(version);
  cr_assert_geq(strtol(version, NULL, 10), 120000, "PostgreSQL >= 12 expected, got %s", version);
  free(version);
}

Test(harness, redis_is_reachable) {
  char host[128];
  int port = 0;
  kt_redis_addr(host, sizeof host, &port);
  struct timeval timeout = {2, 0};
  redisContext *ctx = redisConnectWithTimeout(host, port, timeout);
  cr_assert_not_null(ctx);
  cr_assert_eq(ctx->err, 0, "cannot connect to Redis at %s:%d: %s", host, port, ctx->errstr);
  redisReply *reply = redisCommand(ctx, "PING");
  cr_assert_not_null(reply);
  cr_assert_eq(reply->type, REDIS_REPLY_STATUS);
  cr_assert_str_eq(reply->str, "PONG");
  freeReplyObject(reply);
  redisFree(ctx);
}

Test(harness, error_names_cover_keel_and_libuv) {
  cr_assert_str_eq(keel_err_name(KEEL_EOPEN), "KEEL_EOPEN");
  cr_assert_str_eq(keel_err_name(UV_EINVAL), "UV_EINVAL");
  cr_assert_str_eq(keel_err_name(0), "OK");
  cr_assert_str_eq(keel_err_name(-29999), "UNKNOWN");
  cr_assert_str_eq(keel_strerror(KEEL_EFULL), "queue is full");
  cr_assert_str_eq(keel_strerror(UV_ETIMEDOUT), uv_strerror(UV_ETIMEDOUT));
  cr_assert_eq(keel_version(), (unsigned)KEEL_VERSION_HEX);
  cr_assert_str_eq(keel_version_string(), KEEL_VERSION_STRING);
}
