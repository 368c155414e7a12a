/* Reply accessors over hiredis's redisReply, and script values. */
#include <hiredis/hiredis.h>
#include <string.h>

#include "keel/redis.h"
#include "redis/redis_internal.h"

KEEL_EXTERN keel_redis_reply_type keel_redis_reply_type_of(const struct redisReply *rep) {
  if (rep == NULL) return KEEL_REDIS_REPLY_NONE;
  switch (rep->type) {
    case REDIS_REPLY_STRING:
      return KEEL_REDIS_REPLY_STRING;
    case REDIS_REPLY_ARRAY:
      return KEEL_REDIS_REPLY_ARRAY;
    case REDIS_REPLY_INTEGER:
      return KEEL_REDIS_REPLY_INTEGER;
    case REDIS_REPLY_NIL:
      return KEEL_REDIS_REPLY_NIL;
    case REDIS_REPLY_STATUS:
      return KEEL_REDIS_REPLY_STATUS;
    case REDIS_REPLY_ERROR:
      return KEEL_REDIS_REPLY_ERROR;
    default:
      return KEEL_REDIS_REPLY_NONE;
  }
}

KEEL_EXTERN long long keel_redis_reply_integer(const struct redisReply *rep) {
  return rep != NULL && rep->type == REDIS_REPLY_INTEGER ? rep->integer : 0;
}

KEEL_EXTERN const char *keel_redis_reply_str(const struct redisReply *rep, size_t *len) {
  if (rep != NULL && rep->str != NULL &&
      (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_STATUS ||
       rep->type == REDIS_REPLY_ERROR)) {
    if (len != NULL) *len = rep->len;
    return rep->str;
  }
  if (len != NULL) *len = 0;
  return NULL;
}

KEEL_EXTERN size_t keel_redis_reply_elements(const struct redisReply *rep) {
  return rep != NULL && rep->type == REDIS_REPLY_ARRAY ? rep->elements : 0;
}

KEEL_EXTERN const struct redisReply *keel_redis_reply_element(const struct redisReply *rep,
                                                              size_t i) {
  if (rep == NULL || rep->type != REDIS_REPLY_ARRAY || i >= rep->elements) return NULL;
  return rep->element[i];
}

KEEL_EXTERN int keel_redis_script_init(keel_redis_script *s, const char *source) {
  if (s == NULL || source == NULL) return UV_EINVAL;
  s->source = source;
  s->len = strlen(source);
  keel__sha1_hex(source, s->len, s->sha1);
  return 0;
}
