/* Internals of src/redis shared between its files (client, locks). */
#ifndef KEEL_REDIS_INTERNAL_H
#define KEEL_REDIS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/histogram.h"
#include "core/util.h"
#include "keel/redis.h"

/* A circular doubly linked list with a sentinel (libuv queue.h style). */
typedef struct keel__rlink {
  struct keel__rlink *prev, *next;
} keel__rlink;

static inline void keel__rlist_init(keel__rlink *h) {
  h->prev = h->next = h;
}
static inline bool keel__rlist_empty(const keel__rlink *h) {
  return h->next == h;
}
static inline void keel__rlist_push(keel__rlink *h, keel__rlink *n) {
  n->next = h;
  n->prev = h->prev;
  h->prev->next = n;
  h->prev = n;
}
static inline void keel__rlist_push_front(keel__rlink *h, keel__rlink *n) {
  n->prev = h;
  n->next = h->next;
  h->next->prev = n;
  h->next = n;
}
static inline void keel__rlist_remove(keel__rlink *n) {
  n->prev->next = n->next;
  n->next->prev = n->prev;
  n->prev = n->next = n;
}

/* Writes the SHA-1 of data as 40 lower-case hex digits and a NUL. */
void keel__sha1_hex(const void *data, size_t len, char out[41]);

/* A parsed connection URL (url.c). */
typedef struct keel__redis_url {
  char *host;     /* TCP host (NULL for a unix socket) */
  int port;       /* TCP port */
  char *path;     /* unix socket path (NULL for TCP) */
  char *user;     /* ACL user or NULL */
  char *password; /* NULL: no AUTH */
  int db;         /* 0: no SELECT */
} keel__redis_url;

/* Parses url into *out (strings allocated with keel__malloc). Returns 0,
 * UV_EINVAL with the reason in errbuf, or UV_ENOMEM (out left empty). */
int keel__redis_url_parse(const char *url, keel__redis_url *out, char *errbuf);
void keel__redis_url_free(keel__redis_url *u);

/* The lock scripts' sources (0 acquire, 1 release, 2 extend), for the
 * benchmark's floor and the docs check. */
const char *keel__redis_lock_script(int which);

/* Lock hooks called by the client (lock.c). */
struct keel_redis_lock;
/* The client is closing: close the lock's timer now (counted in the
 * client's open handles through keel__redis_handle_opened/closed). */
void keel__redis_lock_client_closing(struct keel_redis_lock *lock);
/* The client's handles are all closed and its commands were answered:
 * deliver what the lock owes (UV_ECANCELED) and free it. */
void keel__redis_lock_client_closed(struct keel_redis_lock *lock);

/* Registers / unregisters a lock on its home client (closed with it). */
void keel__redis_lock_register(keel_redis *r, keel__rlink *link);
/* Counts a uv handle of a lock as open on r until its close callback calls
 * keel__redis_handle_closed(). */
void keel__redis_handle_opened(keel_redis *r);
void keel__redis_handle_closed(keel_redis *r);
/* True once keel_redis_close() was called. */
bool keel__redis_closing(const keel_redis *r);
/* The client's default command timeout. */
uint64_t keel__redis_command_timeout(const keel_redis *r);

/* ---- for pubsub.c -------------------------------------------------------- */
struct redisAsyncContext;
struct keel__redis_subconn;
/* Drives ac with a uv_poll_t counted in r's open handles (client.c's
 * adapter). Returns 0, UV_ENOMEM or uv_poll_init's error. */
int keel__redis_attach(keel_redis *r, struct redisAsyncContext *ac);
const keel__redis_url *keel__redis_url_of(const keel_redis *r);
const keel_redis_opts *keel__redis_opts_of(const keel_redis *r);
uv_loop_t *keel__redis_loop_of(const keel_redis *r);
char *keel__redis_errbuf(keel_redis *r);
/* The client's subscriber connection (NULL until the first subscription). */
struct keel__redis_subconn **keel__redis_subconn_slot(keel_redis *r);
/* keel_redis_close() began: drop the subscriber connection, close its
 * timers (counted in the client's open handles). */
void keel__redis_pubsub_closing(keel_redis *r);
/* All handles are closed: deliver ENDED to every subscription, free all. */
void keel__redis_pubsub_closed(keel_redis *r);

#endif
