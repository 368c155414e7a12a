/*
 * The Redis client: one hiredis 0.14 async context at a time, driven by a
 * uv_poll_t of our own (hiredis's adapters/libuv.h, with keel's allocator,
 * no leak when uv_poll_init fails, and a close callback we can count).
 *
 * hiredis 0.14 rules this file relies on (async.c):
 * - a reply callback runs with REDIS_IN_CALLBACK set: redisAsyncFree() from
 *   inside only flags the context, which is freed when the callback
 *   returns; every callback still registered then runs with a NULL reply;
 * - onConnect runs WITHOUT that flag (freeing the context there is a use
 *   after free in redisAsyncHandleWrite): keel runs no user code in it;
 *   after onConnect(REDIS_ERR) hiredis frees the context itself;
 * - onDisconnect runs only for a context that had connected, after the
 *   NULL-reply callbacks and the adapter cleanup, right before the free;
 * - a read error frees the context inside redisAsyncHandleRead: the poll
 *   callback must not touch it afterwards (cleanup clears p->ac).
 * keel sets r->ac to NULL before any free it starts, and before running any
 * user code while hiredis frees a context, so a close or command from that
 * user code never touches a dying context.
 */
#include "redis/redis_stats.h"
#include "core/stats_hook.h"
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "keel/redis.h"
#include "redis/redis_internal.h"

enum cmd_state {
  CMD_WAITING = 0, /* in r->waiting, not given to hiredis */
  CMD_INFLIGHT,    /* in r->inflight, given to hiredis */
  CMD_OWED,        /* its callback is owed (timed out, or close): hiredis's
                      callback for it only clears in_hiredis */
  CMD_DONE         /* user callback run */
};

typedef struct cmd {
  keel__rlink link;
  keel_redis *r;
  keel_redis_reply_cb cb;
  void *data;
  uint64_t deadline; /* loop ms */
  uint64_t sent_ns;
  const keel_redis_script *script; /* eval: the script */
  size_t tail_off;                 /* eval: offset of the numkeys argument */
  int argc_total;                  /* eval: arguments of EVALSHA / EVAL */
  int owed;                        /* status owed when in r->finished */
  unsigned char state;
  bool in_hiredis; /* hiredis holds a callback for it */
  bool resent;     /* eval: EVAL already sent after NOSCRIPT */
  size_t len;
  char buf[]; /* the command in RESP */
} cmd;

typedef struct rpoll {
  uv_poll_t handle;
  redisAsyncContext *ac;
  keel_redis *r;
  int events;
  bool closing;
} rpoll;

struct keel_redis {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_redis_opts opts;
  keel__redis_url url;
  redisAsyncContext *ac; /* the live context (NULL while down or dying) */
  keel_redis_state state;
  bool closing;
  bool finished_close; /* close completion ran */
  bool ready_unreported;
  bool gave_up;        /* reconnect false and the connection is down */
  unsigned setup_left; /* AUTH / SELECT replies still awaited */
  uint64_t attempts;
  uint64_t prev_delay;
  keel_rng rng;
  uv_timer_t cmd_timer;   /* command deadlines */
  uv_timer_t conn_timer;  /* connect deadline, reconnect delay, READY report */
  uint64_t cmd_timer_due; /* 0: not armed */
  unsigned handles_open;
  keel__rlink waiting;
  keel__rlink inflight;
  keel__rlink finished; /* callbacks owed (close) */
  keel__rlink locks;
  struct keel__redis_subconn *sc; /* pubsub.c: subscriber connection */
  uint64_t npending;
  keel_close_cb close_cb;
  void *close_data;
  keel_redis_stats st;
  keel__histogram hist;
  char errbuf[KEEL__ERRBUF_SIZE];
};

static void conn_lost(keel_redis *r, int status);
static void maybe_finish_close(keel_redis *r);

/* ---- adapter ------------------------------------------------------------ */

static void poll_closed(uv_handle_t *h) {
  rpoll *p = h->data;
  keel_redis *r = p->r;
  keel__free(p);
  keel__redis_handle_closed(r);
}

static void poll_cb(uv_poll_t *h, int status, int events) {
  rpoll *p = h->data;
  if (status < 0) events = UV_READABLE | UV_WRITABLE; /* hiredis finds the error */
  if (p->ac != NULL && (events & UV_READABLE)) redisAsyncHandleRead(p->ac);
  if (p->ac != NULL && (events & UV_WRITABLE)) redisAsyncHandleWrite(p->ac);
}

static void ev_update(rpoll *p) {
  if (p->closing) return;
  if (p->events != 0)
    uv_poll_start(&p->handle, p->events, poll_cb);
  else
    uv_poll_stop(&p->handle);
}
static void ev_add_read(void *d) {
  rpoll *p = d;
  p->events |= UV_READABLE;
  ev_update(p);
}
static void ev_del_read(void *d) {
  rpoll *p = d;
  p->events &= ~UV_READABLE;
  ev_update(p);
}
static void ev_add_write(void *d) {
  rpoll *p = d;
  p->events |= UV_WRITABLE;
  ev_update(p);
}
static void ev_del_write(void *d) {
  rpoll *p = d;
  p->events &= ~UV_WRITABLE;
  ev_update(p);
}
static void ev_cleanup(void *d) {
  rpoll *p = d;
  p->ac = NULL;
  if (p->closing) return;
  p->closing = true;
  uv_close((uv_handle_t *)&p->handle, poll_closed);
}

int keel__redis_attach(keel_redis *r, redisAsyncContext *ac) {
  rpoll *p = keel__calloc(1, sizeof *p);
  if (p == NULL) return UV_ENOMEM;
  int rc = uv_poll_init(r->loop, &p->handle, ac->c.fd);
  if (rc != 0) {
    keel__free(p);
    return rc;
  }
  p->handle.data = p;
  p->ac = ac;
  p->r = r;
  r->handles_open++;
  ac->ev.data = p;
  ac->ev.addRead = ev_add_read;
  ac->ev.delRead = ev_del_read;
  ac->ev.addWrite = ev_add_write;
  ac->ev.delWrite = ev_del_write;
  ac->ev.cleanup = ev_cleanup;
  return 0;
}

/* ---- helpers --------------------------------------------------------------- */

void keel__redis_handle_opened(keel_redis *r) {
  r->handles_open++;
}

void keel__redis_handle_closed(keel_redis *r) {
  r->handles_open--;
  maybe_finish_close(r);
}

bool keel__redis_closing(const keel_redis *r) {
  return r->closing;
}

uint64_t keel__redis_command_timeout(const keel_redis *r) {
  return r->opts.command_timeout_ms;
}

const keel__redis_url *keel__redis_url_of(const keel_redis *r) {
  return &r->url;
}

const keel_redis_opts *keel__redis_opts_of(const keel_redis *r) {
  return &r->opts;
}

uv_loop_t *keel__redis_loop_of(const keel_redis *r) {
  return r->loop;
}

char *keel__redis_errbuf(keel_redis *r) {
  return r->errbuf;
}

struct keel__redis_subconn **keel__redis_subconn_slot(keel_redis *r) {
  return &r->sc;
}

void keel__redis_lock_register(keel_redis *r, keel__rlink *link) {
  keel__rlist_push(&r->locks, link);
}

static void set_state(keel_redis *r, keel_redis_state s, int status) {
  r->state = s;
  if (!r->closing && r->opts.on_state != NULL) r->opts.on_state(r, s, status, r->opts.data);
}

static void record_latency(keel_redis *r, cmd *c) {
  uint64_t ns = uv_hrtime() - c->sent_ns;
  keel__histogram_record(&r->hist, ns);
  uint64_t us = ns / 1000u;
  unsigned i = 0;
  while (i < 23 && us >= ((uint64_t)1 << i)) i++;
  r->st.latency_buckets[i]++;
}

static void cmd_free_if_done(cmd *c) {
  if (c->state == CMD_DONE && !c->in_hiredis) keel__free(c);
}

/* Runs the user's callback of c (state DONE first), counting it. */
static void deliver(keel_redis *r, cmd *c, int status, const redisReply *rep) {
  c->state = CMD_DONE;
  r->npending--;
  r->st.commands++;
  if (status == KEEL_EREDIS) r->st.errors++;
  if (status == UV_ETIMEDOUT) r->st.timeouts++;
  if (status == KEEL_EINDOUBT) r->st.in_doubt++;
  if (c->cb != NULL) c->cb(r, status, rep, c->data);
}

static void cmd_timer_cb(uv_timer_t *t);

/* Arms the command timer for deadline `due` unless it fires earlier. */
static void arm_cmd_timer(keel_redis *r, uint64_t due) {
  if (r->closing) return;
  if (r->cmd_timer_due != 0 && r->cmd_timer_due <= due) return;
  uint64_t now = uv_now(r->loop);
  r->cmd_timer_due = due;
  uv_timer_start(&r->cmd_timer, cmd_timer_cb, due > now ? due - now : 0, 0);
}

/* ---- sending ------------------------------------------------------------- */

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Gives c to hiredis. Returns 0 or -1 (hiredis refused: it is dying). */
static int send_cmd(keel_redis *r, cmd *c) {
  if (redisAsyncFormattedCommand(r->ac, on_reply, c, c->buf, c->len) != REDIS_OK) return -1;
  c->in_hiredis = true;
  c->state = CMD_INFLIGHT;
  c->sent_ns = uv_hrtime();
  keel__rlist_push(&r->inflight, &c->link);
  r->st.in_flight++;
  return 0;
}

static void flush_waiting(keel_redis *r) {
  while (!keel__rlist_empty(&r->waiting) && r->ac != NULL && r->state == KEEL_REDIS_READY) {
    cmd *c = KEEL__CONTAINER_OF(r->waiting.next, cmd, link);
    keel__rlist_remove(&c->link);
    if (send_cmd(r, c) != 0) {
      keel__rlist_push_front(&r->waiting, &c->link);
      break;
    }
  }
}

/* The EVAL form of an eval command, allocated (NULL on failure). */
static char *eval_form(const cmd *c, size_t *len) {
  const keel_redis_script *s = c->script;
  char head[96];
  int hl = snprintf(head, sizeof head, "*%d\r\n$4\r\nEVAL\r\n$%zu\r\n", c->argc_total, s->len);
  if (hl < 0) return NULL;
  size_t tail = c->len - c->tail_off;
  size_t n = (size_t)hl + s->len + 2 + tail;
  char *buf = keel__malloc(n);
  if (buf == NULL) return NULL;
  memcpy(buf, head, (size_t)hl);
  memcpy(buf + hl, s->source, s->len);
  memcpy(buf + (size_t)hl + s->len, "\r\n", 2);
  memcpy(buf + (size_t)hl + s->len + 2, c->buf + c->tail_off, tail);
  *len = n;
  return buf;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  cmd *c = privdata;
  keel_redis *r = c->r;
  redisReply *rep = reply;
  c->in_hiredis = false;
  if (c->state == CMD_OWED) return; /* timed out or cancelled: delivered later */
  if (c->state == CMD_DONE) {       /* cannot happen: DONE is never in hiredis */
    cmd_free_if_done(c);
    return;
  }
  keel__rlist_remove(&c->link);
  r->st.in_flight--;
  if (rep == NULL) {
    /* hiredis is freeing ac: a lost connection (or our own reset, in which
     * case r->ac is already NULL). */
    if (r->ac == ac) conn_lost(r, KEEL_ECONN);
    deliver(r, c, KEEL_EINDOUBT, NULL);
    cmd_free_if_done(c);
    return;
  }
  record_latency(r, c);
  if (rep->type == REDIS_REPLY_ERROR) {
    if (c->script != NULL && !c->resent && rep->len >= 8 && memcmp(rep->str, "NOSCRIPT", 8) == 0 &&
        r->ac == ac && !r->closing) {
      size_t elen = 0;
      char *ebuf = eval_form(c, &elen);
      if (ebuf != NULL) {
        const char *largv[] = {"SCRIPT", "LOAD", c->script->source};
        size_t llen[] = {6, 4, c->script->len};
        redisAsyncCommandArgv(ac, NULL, NULL, 3, largv, llen);
        if (redisAsyncFormattedCommand(ac, on_reply, c, ebuf, elen) == REDIS_OK) {
          keel__free(ebuf);
          c->resent = true;
          c->in_hiredis = true;
          c->sent_ns = uv_hrtime();
          keel__rlist_push(&r->inflight, &c->link);
          r->st.in_flight++;
          r->st.noscript++;
          return;
        }
        keel__free(ebuf);
      }
    }
    snprintf(r->errbuf, sizeof r->errbuf, "%.*s", (int)rep->len, rep->str);
    deliver(r, c, KEEL_EREDIS, rep);
  } else {
    deliver(r, c, 0, rep);
  }
  cmd_free_if_done(c);
}

/* ---- command timeouts -------------------------------------------------------- */

static void reset_connection(keel_redis *r) {
  redisAsyncContext *ac = r->ac;
  if (ac == NULL) return;
  r->ac = NULL;
  redisAsyncFree(ac); /* deferred by hiredis when inside its callback */
}

/* Goes DOWN with status (user code may run: on_state), then frees the
 * context we had (its in-flight commands get KEEL_EINDOUBT). */
static void drop_connection(keel_redis *r, int status) {
  redisAsyncContext *ac = r->ac;
  conn_lost(r, status);
  if (ac != NULL) redisAsyncFree(ac);
}

static void cmd_timer_cb(uv_timer_t *t) {
  keel_redis *r = t->data;
  r->cmd_timer_due = 0;
  uint64_t now = uv_now(r->loop);
  keel__rlink expired;
  keel__rlist_init(&expired);
  bool sent_expired = false;
  uint64_t next = 0;
  keel__rlink *lists[2] = {&r->waiting, &r->inflight};
  for (int li = 0; li < 2; li++) {
    keel__rlink *h = lists[li];
    for (keel__rlink *n = h->next; n != h;) {
      keel__rlink *nx = n->next;
      cmd *c = KEEL__CONTAINER_OF(n, cmd, link);
      if (c->deadline <= now) {
        if (c->state == CMD_INFLIGHT) {
          sent_expired = true;
          r->st.in_flight--;
        }
        keel__rlist_remove(&c->link);
        keel__rlist_push(&expired, &c->link);
        c->state = CMD_OWED;
        c->owed = UV_ETIMEDOUT;
      } else if (next == 0 || c->deadline < next) {
        next = c->deadline;
      }
      n = nx;
    }
  }
  if (next != 0) arm_cmd_timer(r, next);
  /* A sent command expired: its outcome is unknown and the connection is
   * reset. DOWN first (new commands wait), then the expired commands get
   * UV_ETIMEDOUT, then the context is freed (the others in flight get
   * KEEL_EINDOUBT). Nothing touches `dying` in between. */
  redisAsyncContext *dying = NULL;
  if (sent_expired && r->ac != NULL) {
    snprintf(r->errbuf, sizeof r->errbuf, "command timed out: connection reset");
    dying = r->ac;
    conn_lost(r, UV_ETIMEDOUT);
  }
  /* Delivered even when a callback above closed r: they expired first. */
  while (!keel__rlist_empty(&expired)) {
    cmd *c = KEEL__CONTAINER_OF(expired.next, cmd, link);
    keel__rlist_remove(&c->link);
    deliver(r, c, UV_ETIMEDOUT, NULL);
    cmd_free_if_done(c);
  }
  if (dying != NULL) redisAsyncFree(dying);
}

/* ---- connecting ------------------------------------------------------------ */

static void conn_timer_cb(uv_timer_t *t);

static void fail_waiting(keel_redis *r, int status) {
  while (!keel__rlist_empty(&r->waiting)) {
    cmd *c = KEEL__CONTAINER_OF(r->waiting.next, cmd, link);
    keel__rlist_remove(&c->link);
    deliver(r, c, status, NULL);
    cmd_free_if_done(c);
    if (r->closing) break; /* close took the rest */
  }
}

/* The connection is gone (r->ac already NULL or about to be set so): go
 * DOWN and schedule the next attempt. */
static void conn_lost(keel_redis *r, int status) {
  r->ac = NULL;
  r->setup_left = 0;
  r->ready_unreported = false;
  if (r->closing || r->state == KEEL_REDIS_DOWN) return;
  if (r->state == KEEL_REDIS_READY) r->st.disconnects++;
  uv_timer_stop(&r->conn_timer);
  if (r->opts.reconnect) {
    r->attempts++;
    uint64_t d = keel_backoff_delay(&r->opts.reconnect_backoff, (unsigned)r->attempts,
                                    r->prev_delay, &r->rng);
    r->prev_delay = d;
    uv_timer_start(&r->conn_timer, conn_timer_cb, d, 0);
  } else {
    r->gave_up = true;
  }
  set_state(r, KEEL_REDIS_DOWN, status);
  if (r->gave_up && !r->closing) fail_waiting(r, KEEL_ECONN);
}

static void become_ready(keel_redis *r) {
  r->state = KEEL_REDIS_READY;
  r->attempts = 0;
  r->prev_delay = 0;
  r->st.connects++;
  uv_timer_stop(&r->conn_timer);
  flush_waiting(r);
  /* Report READY from a timer: never from inside hiredis's onConnect. */
  r->ready_unreported = true;
  uv_timer_start(&r->conn_timer, conn_timer_cb, 0, 0);
}

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  keel_redis *r = privdata;
  redisReply *rep = reply;
  if (rep == NULL || r->ac != ac) return; /* dying */
  if (rep->type == REDIS_REPLY_ERROR) {
    snprintf(r->errbuf, sizeof r->errbuf, "%.*s", (int)rep->len, rep->str);
    bool auth =
        rep->len >= 6 && (memcmp(rep->str, "WRONGP", 6) == 0 ||
                          memcmp(rep->str, "NOAUTH", 6) == 0 || strstr(rep->str, "AUTH") != NULL);
    drop_connection(r, auth ? KEEL_EAUTH : KEEL_EREDIS);
    return;
  }
  if (--r->setup_left == 0) become_ready(r);
}

static void on_connect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  keel_redis *r = ac->data;
  if (r->ac != ac) return;
  if (status != REDIS_OK) {
    /* hiredis frees ac right after this returns */
    snprintf(r->errbuf, sizeof r->errbuf, "connect: %s", ac->errstr);
    conn_lost(r, KEEL_ECONN);
    return;
  }
  r->setup_left = 0;
  if (r->url.password != NULL) {
    const char *argv[3] = {"AUTH", r->url.user, r->url.password};
    size_t lens[3] = {4, r->url.user != NULL ? strlen(r->url.user) : 0, strlen(r->url.password)};
    if (r->url.user != NULL)
      redisAsyncCommandArgv(ac, on_setup_reply, r, 3, argv, lens);
    else {
      argv[1] = r->url.password;
      lens[1] = lens[2];
      redisAsyncCommandArgv(ac, on_setup_reply, r, 2, argv, lens);
    }
    r->setup_left++;
  }
  if (r->url.db != 0) {
    char db[16];
    int n = snprintf(db, sizeof db, "%d", r->url.db);
    const char *argv[2] = {"SELECT", db};
    size_t lens[2] = {6, (size_t)n};
    redisAsyncCommandArgv(ac, on_setup_reply, r, 2, argv, lens);
    r->setup_left++;
  }
  if (r->setup_left == 0) become_ready(r);
}

static void on_disconnect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  keel_redis *r = ac->data;
  if (r->ac != ac) return; /* a reset we started */
  snprintf(r->errbuf, sizeof r->errbuf, "connection lost: %s",
           ac->errstr != NULL && ac->errstr[0] != '\0' ? ac->errstr : "closed by the server");
  (void)status;
  conn_lost(r, KEEL_ECONN);
}

static void start_connect(keel_redis *r) {
  if (r->attempts > 0) r->st.reconnects++;
  redisAsyncContext *ac = r->url.path != NULL ? redisAsyncConnectUnix(r->url.path)
                                              : redisAsyncConnect(r->url.host, r->url.port);
  r->state = KEEL_REDIS_CONNECTING;
  if (ac == NULL) {
    snprintf(r->errbuf, sizeof r->errbuf, "connect: out of memory");
    conn_lost(r, UV_ENOMEM);
    return;
  }
  if (ac->err != 0) {
    snprintf(r->errbuf, sizeof r->errbuf, "connect: %s", ac->errstr);
    redisAsyncFree(ac);
    conn_lost(r, KEEL_ECONN);
    return;
  }
  int rc = keel__redis_attach(r, ac);
  if (rc != 0) {
    snprintf(r->errbuf, sizeof r->errbuf, "connect: %s", uv_strerror(rc));
    redisAsyncFree(ac);
    conn_lost(r, rc);
    return;
  }
  ac->data = r;
  r->ac = ac;
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  redisAsyncSetConnectCallback(ac, on_connect);
  uv_timer_start(&r->conn_timer, conn_timer_cb, r->opts.connect_timeout_ms, 0);
}

static void conn_timer_cb(uv_timer_t *t) {
  keel_redis *r = t->data;
  if (r->closing) return;
  if (r->state == KEEL_REDIS_READY) {
    if (r->ready_unreported) {
      r->ready_unreported = false;
      set_state(r, KEEL_REDIS_READY, 0);
    }
    return;
  }
  if (r->state == KEEL_REDIS_CONNECTING && r->ac != NULL) {
    snprintf(r->errbuf, sizeof r->errbuf, "connect timed out after %u ms",
             (unsigned)r->opts.connect_timeout_ms);
    drop_connection(r, UV_ETIMEDOUT);
    return;
  }
  /* DOWN (or the first attempt): connect */
  bool first = r->st.connects == 0 && r->attempts == 0;
  if (!first) set_state(r, KEEL_REDIS_CONNECTING, 0);
  if (r->closing) return;
  start_connect(r);
}

/* ---- public: life cycle ------------------------------------------------------ */

KEEL_EXTERN void keel_redis_opts_init(keel_redis_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->connect_timeout_ms = 2000;
  opts->command_timeout_ms = 2000;
  keel_backoff_full_jitter(&opts->reconnect_backoff, 50, 2.0, 5000);
  opts->reconnect = true;
  opts->max_pending = KEEL_REDIS_MAX_PENDING_DEFAULT;
}

KEEL_EXTERN int keel_redis_new(uv_loop_t *loop, const keel_redis_opts *opts, keel_redis **out) {
  if (loop == NULL || opts == NULL || out == NULL || opts->url == NULL) return UV_EINVAL;
  if (keel_backoff_validate(&opts->reconnect_backoff, NULL) != 0) return UV_EINVAL;
  keel_redis *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return UV_ENOMEM;
  int rc = keel__redis_url_parse(opts->url, &r->url, r->errbuf);
  if (rc != 0) {
    keel__free(r);
    return rc;
  }
  r->loop = loop;
  r->opts = *opts;
  r->opts.url = NULL; /* not kept */
  if (r->opts.connect_timeout_ms == 0) r->opts.connect_timeout_ms = 2000;
  if (r->opts.command_timeout_ms == 0) r->opts.command_timeout_ms = 2000;
  if (r->opts.max_pending == 0) r->opts.max_pending = KEEL_REDIS_MAX_PENDING_DEFAULT;
  keel__rlist_init(&r->waiting);
  keel__rlist_init(&r->inflight);
  keel__rlist_init(&r->finished);
  keel__rlist_init(&r->locks);
  keel_rng_seed(&r->rng, uv_hrtime() ^ (uint64_t)(uintptr_t)r);
  r->state = KEEL_REDIS_CONNECTING;
  uv_timer_init(loop, &r->cmd_timer);
  uv_timer_init(loop, &r->conn_timer);
  r->cmd_timer.data = r;
  r->conn_timer.data = r;
  r->handles_open = 2;
  uv_timer_start(&r->conn_timer, conn_timer_cb, 0, 0); /* connect on a later iteration */
  *out = r;
  return 0;
}

/* ---- public: commands --------------------------------------------------------- */

static size_t digits(size_t v) {
  size_t n = 1;
  while (v >= 10) {
    v /= 10;
    n++;
  }
  return n;
}

static int check_args(int argc, const char *const *argv) {
  if (argc < 0 || (argc > 0 && argv == NULL)) return UV_EINVAL;
  for (int i = 0; i < argc; i++)
    if (argv[i] == NULL) return UV_EINVAL;
  return 0;
}

static bool word_is(const char *s, size_t len, const char *w) {
  size_t wl = strlen(w);
  return len == wl && strncasecmp(s, w, wl) == 0;
}

/* Commands that change the connection's protocol (replies no longer one per
 * command, or none at all): the reply queue would stall behind them. */
static bool is_refused(int argc, const char *const *argv, const size_t *argvlen) {
  static const char *const bad[] = {"SUBSCRIBE",   "PSUBSCRIBE",   "SSUBSCRIBE",
                                    "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
                                    "MONITOR",     "QUIT",         "HELLO"};
  size_t len = argvlen != NULL ? argvlen[0] : strlen(argv[0]);
  for (size_t i = 0; i < KEEL__ARRAY_SIZE(bad); i++)
    if (word_is(argv[0], len, bad[i])) return true;
  if (argc >= 2 && word_is(argv[0], len, "CLIENT") &&
      word_is(argv[1], argvlen != NULL ? argvlen[1] : strlen(argv[1]), "REPLY"))
    return true;
  return false;
}

static int admit(keel_redis *r) {
  if (r->closing) return KEEL_ECLOSING;
  if (r->gave_up) return KEEL_ECONN;
  if (r->npending >= r->opts.max_pending) return UV_ENOBUFS;
  return 0;
}

/* Writes v in decimal at p; returns the new end. */
static char *put_uint(char *p, size_t v) {
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v != 0);
  while (n > 0) *p++ = tmp[--n];
  return p;
}

/* Writes "<c><v>\r\n" at p; returns the new end. */
static char *put_head(char *p, char c, size_t v) {
  *p++ = c;
  p = put_uint(p, v);
  *p++ = '\r';
  *p++ = '\n';
  return p;
}

/* Appends "$len\r\nbytes\r\n" at p; returns the new end. */
static char *put_bulk(char *p, const char *s, size_t len) {
  p = put_head(p, '$', len);
  memcpy(p, s, len);
  p += len;
  *p++ = '\r';
  *p++ = '\n';
  return p;
}

/* Queues (or sends) c; it is fully built. */
static void submit(keel_redis *r, cmd *c, uint64_t timeout_ms) {
  c->r = r;
  c->deadline = uv_now(r->loop) + (timeout_ms != 0 ? timeout_ms : r->opts.command_timeout_ms);
  r->npending++;
  if (r->ac != NULL && r->state == KEEL_REDIS_READY && keel__rlist_empty(&r->waiting) &&
      send_cmd(r, c) == 0) {
    /* sent */
  } else {
    c->state = CMD_WAITING;
    keel__rlist_push(&r->waiting, &c->link);
  }
  arm_cmd_timer(r, c->deadline);
}

static size_t arg_len(const char *const *argv, const size_t *argvlen, int i) {
  return argvlen != NULL ? argvlen[i] : strlen(argv[i]);
}

KEEL_EXTERN int keel_redis_command_timeout(keel_redis *r, uint64_t timeout_ms, int argc,
                                           const char *const *argv, const size_t *argvlen,
                                           keel_redis_reply_cb cb, void *data) {
  if (r == NULL || argc < 1 || check_args(argc, argv) != 0) return UV_EINVAL;
  if (is_refused(argc, argv, argvlen))
    return keel__fail(r->errbuf, UV_EINVAL, "%.*s changes the connection's protocol",
                      (int)(arg_len(argv, argvlen, 0) > 32 ? 32 : arg_len(argv, argvlen, 0)),
                      argv[0]);
  int rc = admit(r);
  if (rc != 0) return rc;
  size_t total = 1 + digits((size_t)argc) + 2;
  for (int i = 0; i < argc; i++) {
    size_t l = arg_len(argv, argvlen, i);
    total += 1 + digits(l) + 2 + l + 2;
  }
  cmd *c = keel__malloc(sizeof *c + total + 1);
  if (c == NULL) return UV_ENOMEM;
  memset(c, 0, sizeof *c);
  c->cb = cb;
  c->data = data;
  char *p = put_head(c->buf, '*', (size_t)argc);
  for (int i = 0; i < argc; i++) p = put_bulk(p, argv[i], arg_len(argv, argvlen, i));
  c->len = (size_t)(p - c->buf);
  submit(r, c, timeout_ms);
  return 0;
}

KEEL_EXTERN int keel_redis_command(keel_redis *r, int argc, const char *const *argv,
                                   const size_t *argvlen, keel_redis_reply_cb cb, void *data) {
  return keel_redis_command_timeout(r, 0, argc, argv, argvlen, cb, data);
}

KEEL_EXTERN int keel_redis_eval_timeout(keel_redis *r, uint64_t timeout_ms,
                                        const keel_redis_script *s, int nkeys, int argc,
                                        const char *const *argv, const size_t *argvlen,
                                        keel_redis_reply_cb cb, void *data) {
  if (r == NULL || s == NULL || s->source == NULL || nkeys < 0 || nkeys > argc ||
      check_args(argc, argv) != 0)
    return UV_EINVAL;
  int rc = admit(r);
  if (rc != 0) return rc;
  char nk[16];
  int nkl = (int)(put_uint(nk, (size_t)nkeys) - nk);
  int total_args = argc + 3;
  size_t head = 1 + digits((size_t)total_args) + 2 + 13 + 4 + 40 + 2;
  size_t tail = 1 + digits((size_t)nkl) + 2 + (size_t)nkl + 2;
  for (int i = 0; i < argc; i++) {
    size_t l = arg_len(argv, argvlen, i);
    tail += 1 + digits(l) + 2 + l + 2;
  }
  cmd *c = keel__malloc(sizeof *c + head + tail + 1);
  if (c == NULL) return UV_ENOMEM;
  memset(c, 0, sizeof *c);
  c->cb = cb;
  c->data = data;
  c->script = s;
  c->argc_total = total_args;
  char *p = put_head(c->buf, '*', (size_t)total_args);
  p = put_bulk(p, "EVALSHA", 7);
  p = put_bulk(p, s->sha1, 40);
  c->tail_off = (size_t)(p - c->buf);
  p = put_bulk(p, nk, (size_t)nkl);
  for (int i = 0; i < argc; i++) p = put_bulk(p, argv[i], arg_len(argv, argvlen, i));
  c->len = (size_t)(p - c->buf);
  submit(r, c, timeout_ms);
  return 0;
}

KEEL_EXTERN int keel_redis_eval(keel_redis *r, const keel_redis_script *s, int nkeys, int argc,
                                const char *const *argv, const size_t *argvlen,
                                keel_redis_reply_cb cb, void *data) {
  return keel_redis_eval_timeout(r, 0, s, nkeys, argc, argv, argvlen, cb, data);
}

/* ---- public: state, stats ----------------------------------------------------- */

KEEL_EXTERN keel_redis_state keel_redis_get_state(const keel_redis *r) {
  return r != NULL ? r->state : KEEL_REDIS_DOWN;
}

KEEL_EXTERN const char *keel_redis_last_error(const keel_redis *r) {
  return r != NULL ? r->errbuf : "";
}

KEEL_EXTERN uv_loop_t *keel_redis_loop(const keel_redis *r) {
  return r != NULL ? r->loop : NULL;
}

KEEL_EXTERN void keel_redis_get_stats(const keel_redis *r, keel_redis_stats *out) {
  if (r == NULL || out == NULL) return;
  *out = r->st;
  memset(out->reserved_, 0, sizeof out->reserved_);
  out->pending = r->npending;
  out->latency_count = r->hist.count;
  out->latency_p50_us = keel__histogram_quantile(&r->hist, 0.5) / 1000.0;
  out->latency_p99_us = keel__histogram_quantile(&r->hist, 0.99) / 1000.0;
  out->latency_max_us = (double)r->hist.max_ns / 1000.0;
}

/* ---- public: close ---------------------------------------------------------- */

static void handle_closed(uv_handle_t *h) {
  keel__redis_handle_closed(h->data);
}

static void maybe_finish_close(keel_redis *r) {
  if (!r->closing || r->finished_close || r->handles_open > 0) return;
  r->finished_close = true;
  /* every command still pending is owed UV_ECANCELED */
  while (!keel__rlist_empty(&r->finished)) {
    cmd *c = KEEL__CONTAINER_OF(r->finished.next, cmd, link);
    keel__rlist_remove(&c->link);
    deliver(r, c, UV_ECANCELED, NULL);
    cmd_free_if_done(c);
  }
  while (!keel__rlist_empty(&r->locks)) {
    keel__rlink *n = r->locks.next;
    keel__rlist_remove(n);
    keel__redis_lock_client_closed((struct keel_redis_lock *)(void *)n);
  }
  keel__redis_pubsub_closed(r);
  keel__redis_url_free(&r->url);
  keel_close_cb cb = r->close_cb;
  void *data = r->close_data;
  keel__free(r);
  if (cb != NULL) cb(r, data);
}

KEEL_EXTERN void keel_redis_close(keel_redis *r, keel_close_cb cb, void *data) {
  if (r == NULL || r->closing) return;
  r->closing = true;
  keel__stats_hooks_detach(&r->stats_hooks); /* drops serve registrations */
  r->st.in_flight = 0;
  r->close_cb = cb;
  r->close_data = data;
  /* Pending commands: owed UV_ECANCELED (delivered at completion). Marked
   * DONE first so that hiredis's NULL callbacks only drop them. */
  keel__rlink *lists[2] = {&r->inflight, &r->waiting};
  for (int li = 0; li < 2; li++) {
    while (!keel__rlist_empty(lists[li])) {
      cmd *c = KEEL__CONTAINER_OF(lists[li]->next, cmd, link);
      keel__rlist_remove(&c->link);
      c->state = CMD_OWED;
      keel__rlist_push(&r->finished, &c->link);
    }
  }
  for (keel__rlink *n = r->locks.next; n != &r->locks; n = n->next)
    keel__redis_lock_client_closing((struct keel_redis_lock *)(void *)n);
  keel__redis_pubsub_closing(r);
  reset_connection(r);
  uv_close((uv_handle_t *)&r->cmd_timer, handle_closed);
  uv_close((uv_handle_t *)&r->conn_timer, handle_closed);
}

keel__stats_hooks *keel__redis_stats_hooks(keel_redis *x) {
  return x->closing ? NULL : &x->stats_hooks; /* no registration once closing */
}
