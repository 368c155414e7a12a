/* The Redis store: one hash per key, <prefix>{<len(scope)>:<scope><key>}
 * (one cluster slot; the length keeps scope "a:b" + key "c" apart from
 * scope "a" + key "b:c"), fields s (state p/c), f (fingerprint), o (owner
 * token), c (status), b (body), k (body cached 1/0). Each step is one
 * script (the sources are in docs/redis.md). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "idem/idem_internal.h"

static const char begin_src[] =
    "local h = redis.call('HMGET', KEYS[1], 's', 'f', 'c', 'b', 'k')\n"
    "if not h[1] then\n"
    "  redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 'o', ARGV[2])\n"
    "  redis.call('PEXPIRE', KEYS[1], ARGV[3])\n"
    "  return {0}\n"
    "end\n"
    "if h[2] ~= ARGV[1] then return {2} end\n"
    "if h[1] == 'p' then return {1, redis.call('PTTL', KEYS[1])} end\n"
    "return {3, h[3], h[4] or '', h[5] or '1'}\n";

static const char complete_src[] =
    "local h = redis.call('HMGET', KEYS[1], 's', 'o')\n"
    "if h[1] ~= 'p' or h[2] ~= ARGV[1] then return 0 end\n"
    "redis.call('HSET', KEYS[1], 's', 'c', 'c', ARGV[2], 'b', ARGV[3], 'k', ARGV[4])\n"
    "redis.call('HDEL', KEYS[1], 'o')\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[5])\n"
    "return 1\n";

static const char abort_src[] =
    "local h = redis.call('HMGET', KEYS[1], 's', 'o')\n"
    "if not h[1] then return 1 end\n"
    "if h[1] == 'p' and h[2] == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end\n"
    "return 0\n";

const char *keel__idem_redis_source(int i) {
  return i == 0 ? begin_src : i == 1 ? complete_src : abort_src;
}

/* Written once (under uv_once: objects may be created on several threads,
 * each with its own loop), read-only after. */
static keel_redis_script scripts[3];
static uv_once_t scripts_once = UV_ONCE_INIT;

static void init_scripts(void) {
  keel_redis_script_init(&scripts[0], begin_src);
  keel_redis_script_init(&scripts[1], complete_src);
  keel_redis_script_init(&scripts[2], abort_src);
}

int keel__idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                         keel_idem **out);

int keel_idem_new_redis(uv_loop_t *loop, keel_redis *redis, const keel_idem_opts *opts,
                        keel_idem **out) {
  uv_once(&scripts_once, init_scripts);
  return keel__idem_new_redis(loop, redis, opts, out);
}

/* The key's Redis name into buf (at most 64 + 1 + 3 + 1 + 255 + 255 + 1). */
static size_t redis_key(const idem_op *op, char *buf, size_t cap) {
  int n =
      snprintf(buf, cap, "%s{%zu:%s%s}", op->idem->prefix, strlen(op->scope), op->scope, op->key);
  return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

static int reply_error(keel_idem *idem, int status) {
  const char *text = keel_redis_last_error(idem->redis);
  keel__fail(idem->last_error, status, "%s",
             text != NULL && text[0] ? text : keel_strerror(status));
  return status;
}

static void on_begin(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  idem_op *op = data;
  keel_idem *idem = op->idem;
  if (status != 0) {
    keel__idem_begin_done(op, reply_error(idem, status), NULL);
    return;
  }
  size_t n = keel_redis_reply_elements(rep);
  long long code = n > 0 ? keel_redis_reply_integer(keel_redis_reply_element(rep, 0)) : -1;
  keel_idem_reply reply;
  memset(&reply, 0, sizeof reply);
  switch (code) {
    case 0:
      reply.token = op->token;
      keel__idem_begin_done(op, 0, &reply);
      return;
    case 1: {
      long long ttl = n > 1 ? keel_redis_reply_integer(keel_redis_reply_element(rep, 1)) : 0;
      reply.ttl_ms = ttl > 0 ? (uint64_t)ttl : 0;
      keel__idem_begin_done(op, KEEL_EINPROGRESS, &reply);
      return;
    }
    case 2:
      keel__idem_begin_done(op, KEEL_EMISMATCH, &reply);
      return;
    case 3:
      if (n == 4) {
        const char *c = keel_redis_reply_str(keel_redis_reply_element(rep, 1), NULL);
        size_t blen = 0;
        const char *b = keel_redis_reply_str(keel_redis_reply_element(rep, 2), &blen);
        const char *k = keel_redis_reply_str(keel_redis_reply_element(rep, 3), NULL);
        reply.completed = true;
        reply.response_status = c != NULL ? (int)strtol(c, NULL, 10) : 0;
        reply.body_cached = k == NULL || k[0] != '0';
        reply.body = reply.body_cached ? (b != NULL ? b : "") : NULL;
        reply.body_len = reply.body_cached ? blen : 0;
        keel__idem_begin_done(op, 0, &reply);
        return;
      }
      break;
    default:
      break;
  }
  keel__fail(idem->last_error, KEEL_EPROTO, "begin: unexpected script reply");
  keel__idem_begin_done(op, KEEL_EPROTO, NULL);
}

static void on_end(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  idem_op *op = data;
  if (status != 0) {
    keel__idem_done(op, reply_error(op->idem, status));
    return;
  }
  if (keel_redis_reply_integer(rep) != 1) {
    keel__fail(op->idem->last_error, KEEL_ELOST, "%s: the key is no longer this token's",
               op->kind == IDEM_COMPLETE ? "complete" : "abort");
    keel__idem_done(op, KEEL_ELOST);
    return;
  }
  keel__idem_done(op, 0);
}

static void install_later(void *arg) {
  keel__idem_done(arg, 0);
}

int keel__idem_redis_start(idem_op *op) {
  keel_idem *idem = op->idem;
  char key[700];
  size_t klen = op->kind == IDEM_INSTALL ? 0 : redis_key(op, key, sizeof key);
  switch (op->kind) {
    case IDEM_BEGIN: {
      snprintf(op->num[0], sizeof op->num[0], "%llu",
               (unsigned long long)idem->opts.processing_ttl_ms);
      const char *argv[] = {key, op->fp, op->token.hex, op->num[0]};
      size_t lens[] = {klen, strlen(op->fp), 32, strlen(op->num[0])};
      return keel_redis_eval(idem->redis, &scripts[0], 1, 4, argv, lens, on_begin, op);
    }
    case IDEM_COMPLETE: {
      snprintf(op->num[0], sizeof op->num[0], "%d", op->response_status);
      snprintf(op->num[1], sizeof op->num[1], "%llu",
               (unsigned long long)idem->opts.completed_ttl_ms);
      const char *argv[] = {key,
                            op->token.hex,
                            op->num[0],
                            op->body != NULL ? op->body : "",
                            op->too_large ? "0" : "1",
                            op->num[1]};
      size_t lens[] = {
          klen, 32, strlen(op->num[0]), op->body != NULL ? op->body_len : 0, 1, strlen(op->num[1])};
      return keel_redis_eval(idem->redis, &scripts[1], 1, 6, argv, lens, on_end, op);
    }
    case IDEM_ABORT: {
      const char *argv[] = {key, op->token.hex};
      size_t lens[] = {klen, 32};
      return keel_redis_eval(idem->redis, &scripts[2], 1, 2, argv, lens, on_end, op);
    }
    case IDEM_INSTALL:
      return keel__call_later(idem->loop, install_later, op);
  }
  return UV_EINVAL;
}
