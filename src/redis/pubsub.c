/*
 * Pub/sub: the client's subscriber connection, a second hiredis 0.14 async
 * context on the same loop (client.c's uv_poll adapter), opened at the
 * first subscription and kept until the client closes.
 *
 * hiredis 0.14's pub/sub rules this file relies on (async.c):
 * - SUBSCRIBE / PSUBSCRIBE register the callback and its privdata in a dict
 *   keyed by channel (pattern); every reply for that channel ("subscribe",
 *   "message", "unsubscribe"; "pmessage" by pattern) goes to it; each
 *   SUBSCRIBE adds 1 to the entry's pending_subs, each "subscribe" reply
 *   takes 1, and an "unsubscribe" reply deletes the entry only when it is 0;
 * - UNSUBSCRIBE registers no callback (its replies go to the dict's);
 * - when the context is freed every dict entry's callback runs once with a
 *   NULL reply; onDisconnect runs after that, for a context that had
 *   connected.
 * So a channel's privdata (a `chan`) lives as long as hiredis's dict may
 * hold it: keel mirrors pending_subs (chan.pending) and frees a chan only
 * when no subscription wants it and hiredis let go of it (in_dict false).
 * User code never runs inside hiredis's onConnect / onDisconnect: READY is
 * told from the "subscribe" reply (a reply callback, like a command's
 * reply), LOST and ENDED from a timer.
 */
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "keel/redis.h"
#include "redis/redis_internal.h"

#define MAX_CHANNEL_LEN 1024u

enum { TOLD_NOTHING = 0, TOLD_READY, TOLD_LOST };
enum { SC_DOWN = 0, SC_CONNECTING, SC_READY };

typedef struct chan chan;
typedef struct keel__redis_subconn subconn;

struct keel_redis_sub {
  keel__rlink link;  /* in its chan's subs (not once ending) */
  keel__rlink nlink; /* in sc->notify while in_notify */
  chan *ch;          /* NULL once ending */
  subconn *sc;
  keel_redis_sub_cb cb;
  void *data;
  uint64_t told_epoch; /* the chan's epoch of the last READY told */
  unsigned char told;
  bool in_notify;
  bool ending; /* only ENDED is owed */
  int end_status;
};

struct chan {
  keel__rlink link; /* in sc->chans */
  keel__rlink subs;
  subconn *sc;
  keel__rlink *cursor; /* next sub of a delivery in progress, or NULL */
  uint64_t epoch;      /* confirmations so far */
  int pending;         /* hiredis's pending_subs of its dict entry */
  bool in_dict;        /* hiredis's context holds a callback for it */
  bool on_wire;        /* SUBSCRIBE sent on the current connection, no UNSUBSCRIBE since */
  bool confirmed;      /* ... and the server confirmed it */
  bool pattern;
  size_t len;
  char name[]; /* NUL-terminated */
};

struct keel__redis_subconn {
  keel_redis *r;
  uv_loop_t *loop;
  redisAsyncContext *ac; /* the live context (NULL while down or dying) */
  int state;
  uv_timer_t conn_timer;   /* connect deadline, reconnect delay */
  uv_timer_t notify_timer; /* READY / LOST / ENDED owed */
  uint64_t attempts, prev_delay;
  keel_rng rng;
  keel__rlink chans;
  keel__rlink notify;
  uint64_t nsubs;
  int lost_status;
  bool lost; /* lost or failed since the last connect */
  bool gave_up;
  bool closing;
  keel_redis_pubsub_stats st;
};

static void sc_connect_timer(uv_timer_t *t);

/* ---- small helpers ------------------------------------------------------- */

static keel_redis_sub *sub_of(keel__rlink *n) {
  return KEEL__CONTAINER_OF(n, keel_redis_sub, link);
}

static void sub_detach(keel_redis_sub *s) {
  chan *ch = s->ch;
  if (ch->cursor == &s->link) ch->cursor = s->link.next;
  keel__rlist_remove(&s->link);
  s->ch = NULL;
}

static void notify_cb(uv_timer_t *t);

static void schedule_notify(keel_redis_sub *s) {
  subconn *sc = s->sc;
  if (!s->in_notify) {
    s->in_notify = true;
    keel__rlist_push(&sc->notify, &s->nlink);
  }
  if (!sc->closing) uv_timer_start(&sc->notify_timer, notify_cb, 0, 0);
}

static void maybe_free_chan(chan *ch) {
  if (!keel__rlist_empty(&ch->subs) || ch->in_dict || ch->cursor != NULL) return;
  keel__rlist_remove(&ch->link);
  keel__free(ch);
}

static void tell_ready(keel_redis_sub *s) {
  s->told = TOLD_READY;
  s->told_epoch = s->ch->epoch;
  s->cb(s, KEEL_REDIS_SUB_READY, 0, NULL, s->data);
}

/* Calls fn on every sub of ch; each may unsubscribe any sub or close the
 * client meanwhile. */
static void chan_each(chan *ch, void (*fn)(keel_redis_sub *s, void *arg), void *arg) {
  subconn *sc = ch->sc;
  keel__rlink *n = ch->subs.next;
  while (n != &ch->subs && !sc->closing) {
    ch->cursor = n->next;
    fn(sub_of(n), arg);
    n = ch->cursor;
  }
  ch->cursor = NULL;
}

/* ---- the wire ------------------------------------------------------------------ */

static void on_chan_reply(redisAsyncContext *ac, void *reply, void *privdata);

static void send_sub(subconn *sc, chan *ch) {
  if (sc->ac == NULL || sc->state != SC_READY || ch->on_wire) return;
  const char *argv[2] = {ch->pattern ? "PSUBSCRIBE" : "SUBSCRIBE", ch->name};
  size_t lens[2] = {strlen(argv[0]), ch->len};
  if (redisAsyncCommandArgv(sc->ac, on_chan_reply, ch, 2, argv, lens) != REDIS_OK) return;
  ch->pending = ch->in_dict ? ch->pending + 1 : 1;
  ch->in_dict = true;
  ch->on_wire = true;
  if (sc->st.connects > 1 && ch->epoch > 0) sc->st.resubscribes++;
}

static void unconfirm(subconn *sc, chan *ch) {
  if (ch->confirmed) sc->st.channels--;
  ch->confirmed = false;
  ch->on_wire = false;
}

static void send_unsub(subconn *sc, chan *ch) {
  if (!ch->on_wire) return;
  unconfirm(sc, ch);
  if (sc->ac == NULL || sc->state != SC_READY) return;
  const char *argv[2] = {ch->pattern ? "PUNSUBSCRIBE" : "UNSUBSCRIBE", ch->name};
  size_t lens[2] = {strlen(argv[0]), ch->len};
  redisAsyncCommandArgv(sc->ac, NULL, NULL, 2, argv, lens);
}

static void deliver_ready(keel_redis_sub *s, void *arg) {
  (void)arg;
  if (s->told != TOLD_READY || s->told_epoch != s->ch->epoch) tell_ready(s);
}

static void deliver_message(keel_redis_sub *s, void *arg) {
  const keel_redis_message *m = arg;
  subconn *sc = s->sc;
  if (s->told != TOLD_READY || s->told_epoch != s->ch->epoch) {
    tell_ready(s);
    if (s->ending || sc->closing) return; /* ended from its READY */
  }
  sc->st.deliveries++;
  s->cb(s, KEEL_REDIS_SUB_MESSAGE, 0, m, s->data);
}

static bool is_str(const redisReply *e) {
  return e != NULL && (e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS);
}

static void on_chan_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  chan *ch = privdata;
  subconn *sc = ch->sc;
  redisReply *rep = reply;
  if (rep == NULL) { /* hiredis is freeing ac: it lets go of ch */
    ch->in_dict = false;
    ch->pending = 0;
    if (sc->ac == NULL || sc->ac == ac) unconfirm(sc, ch);
    maybe_free_chan(ch);
    return;
  }
  if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 2 || !is_str(rep->element[0])) return;
  const char *kind = rep->element[0]->str;
  if (kind[0] == 'p' || kind[0] == 'P') kind++;
  if (strcasecmp(kind, "subscribe") == 0) {
    ch->pending--;
    if (ac != sc->ac || !ch->on_wire || ch->confirmed) return;
    ch->confirmed = true;
    ch->epoch++;
    sc->st.channels++;
    chan_each(ch, deliver_ready, NULL);
  } else if (strcasecmp(kind, "unsubscribe") == 0) {
    if (ch->pending == 0) {
      ch->in_dict = false;
      maybe_free_chan(ch);
    }
  } else if (strcasecmp(kind, "message") == 0) {
    keel_redis_message m = {0};
    size_t at = ch->pattern ? 2 : 1;
    if (rep->elements < at + 2 || !is_str(rep->element[at]) || !is_str(rep->element[at + 1]))
      return;
    if (ch->pattern) {
      m.pattern = rep->element[1]->str;
      m.pattern_len = rep->element[1]->len;
    }
    m.channel = rep->element[at]->str;
    m.channel_len = rep->element[at]->len;
    m.payload = rep->element[at + 1]->str;
    m.payload_len = rep->element[at + 1]->len;
    sc->st.messages++;
    if (!ch->on_wire || ac != sc->ac || keel__rlist_empty(&ch->subs)) {
      sc->st.dropped++;
      return;
    }
    chan_each(ch, deliver_message, &m);
  }
}

/* ---- connection ----------------------------------------------------------- */

/* The subscriber connection is gone (sc->ac already NULL or about to be):
 * go DOWN, owe LOST to every subscription, schedule the next attempt. */
static void sc_lost(subconn *sc, int status) {
  sc->ac = NULL;
  if (sc->closing || sc->state == SC_DOWN) return;
  if (sc->state == SC_READY) {
    sc->st.disconnects++;
    sc->st.connected = false;
  }
  sc->state = SC_DOWN;
  sc->lost = true;
  sc->lost_status = status;
  uv_timer_stop(&sc->conn_timer);
  const keel_redis_opts *o = keel__redis_opts_of(sc->r);
  if (o->reconnect) {
    sc->attempts++;
    uint64_t d =
        keel_backoff_delay(&o->reconnect_backoff, (unsigned)sc->attempts, sc->prev_delay, &sc->rng);
    sc->prev_delay = d;
    uv_timer_start(&sc->conn_timer, sc_connect_timer, d, 0);
  } else {
    sc->gave_up = true;
  }
  /* Every subscription hears about it from the timer: LOST, or ENDED
   * (KEEL_ECONN) when no reconnect follows. */
  for (keel__rlink *c = sc->chans.next; c != &sc->chans; c = c->next) {
    chan *ch = KEEL__CONTAINER_OF(c, chan, link);
    unconfirm(sc, ch);
    for (keel__rlink *n = ch->subs.next; n != &ch->subs;) {
      keel_redis_sub *s = sub_of(n);
      n = n->next;
      if (sc->gave_up) {
        sub_detach(s);
        s->ending = true;
        s->end_status = KEEL_ECONN;
        sc->nsubs--;
      }
      schedule_notify(s);
    }
  }
}

static void sc_ready(subconn *sc) {
  sc->state = SC_READY;
  sc->attempts = 0;
  sc->prev_delay = 0;
  sc->lost = false;
  sc->st.connects++;
  sc->st.connected = true;
  uv_timer_stop(&sc->conn_timer);
  for (keel__rlink *c = sc->chans.next; c != &sc->chans;) {
    chan *ch = KEEL__CONTAINER_OF(c, chan, link);
    c = c->next;
    if (!keel__rlist_empty(&ch->subs)) send_sub(sc, ch);
  }
}

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *privdata) {
  subconn *sc = privdata;
  redisReply *rep = reply;
  if (rep == NULL || sc->ac != ac) return;
  if (rep->type == REDIS_REPLY_ERROR) {
    snprintf(keel__redis_errbuf(sc->r), KEEL__ERRBUF_SIZE, "subscriber: %.*s", (int)rep->len,
             rep->str);
    sc_lost(sc, KEEL_EAUTH);
    redisAsyncFree(ac); /* deferred by hiredis: we are in its callback */
    return;
  }
  sc_ready(sc);
}

static void on_connect(const redisAsyncContext *cac, int status) {
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  subconn *sc = ac->data;
  if (sc->ac != ac) return;
  if (status != REDIS_OK) { /* hiredis frees ac right after this returns */
    snprintf(keel__redis_errbuf(sc->r), KEEL__ERRBUF_SIZE, "subscriber connect: %s", ac->errstr);
    sc_lost(sc, KEEL_ECONN);
    return;
  }
  const keel__redis_url *u = keel__redis_url_of(sc->r);
  if (u->password == NULL) {
    sc_ready(sc);
    return;
  }
  const char *argv[3] = {"AUTH", u->user != NULL ? u->user : u->password, u->password};
  size_t lens[3] = {4, strlen(argv[1]), strlen(u->password)};
  redisAsyncCommandArgv(ac, on_setup_reply, sc, u->user != NULL ? 3 : 2, argv, lens);
}

static void on_disconnect(const redisAsyncContext *cac, int status) {
  (void)status;
  redisAsyncContext *ac = (redisAsyncContext *)cac;
  subconn *sc = ac->data;
  if (sc->ac != ac) return; /* a reset we started */
  snprintf(keel__redis_errbuf(sc->r), KEEL__ERRBUF_SIZE, "subscriber connection lost: %s",
           ac->errstr[0] != '\0' ? ac->errstr : "closed by the server");
  sc_lost(sc, KEEL_ECONN);
}

static void sc_start_connect(subconn *sc) {
  const keel__redis_url *u = keel__redis_url_of(sc->r);
  char *errbuf = keel__redis_errbuf(sc->r);
  sc->state = SC_CONNECTING;
  redisAsyncContext *ac =
      u->path != NULL ? redisAsyncConnectUnix(u->path) : redisAsyncConnect(u->host, u->port);
  if (ac == NULL) {
    snprintf(errbuf, KEEL__ERRBUF_SIZE, "subscriber connect: out of memory");
    sc_lost(sc, UV_ENOMEM);
    return;
  }
  if (ac->err != 0) {
    snprintf(errbuf, KEEL__ERRBUF_SIZE, "subscriber connect: %s", ac->errstr);
    redisAsyncFree(ac);
    sc_lost(sc, KEEL_ECONN);
    return;
  }
  int rc = keel__redis_attach(sc->r, ac);
  if (rc != 0) {
    snprintf(errbuf, KEEL__ERRBUF_SIZE, "subscriber connect: %s", uv_strerror(rc));
    redisAsyncFree(ac);
    sc_lost(sc, rc);
    return;
  }
  ac->data = sc;
  sc->ac = ac;
  /* A new context: nothing of ours is in its dicts yet (the last one was
   * freed before this timer could run). */
  for (keel__rlink *c = sc->chans.next; c != &sc->chans; c = c->next) {
    chan *ch = KEEL__CONTAINER_OF(c, chan, link);
    ch->in_dict = false;
    ch->pending = 0;
  }
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
  redisAsyncSetConnectCallback(ac, on_connect);
  uv_timer_start(&sc->conn_timer, sc_connect_timer, keel__redis_opts_of(sc->r)->connect_timeout_ms,
                 0);
}

static void sc_connect_timer(uv_timer_t *t) {
  subconn *sc = t->data;
  if (sc->closing || sc->state == SC_READY) return;
  if (sc->state == SC_CONNECTING && sc->ac != NULL) {
    redisAsyncContext *ac = sc->ac;
    snprintf(keel__redis_errbuf(sc->r), KEEL__ERRBUF_SIZE,
             "subscriber connect timed out after %u ms",
             (unsigned)keel__redis_opts_of(sc->r)->connect_timeout_ms);
    sc_lost(sc, UV_ETIMEDOUT);
    redisAsyncFree(ac);
    return;
  }
  sc_start_connect(sc);
}

/* ---- events owed ------------------------------------------------------------------ */

static void end_sub(keel_redis_sub *s) {
  s->cb(s, KEEL_REDIS_SUB_ENDED, s->end_status, NULL, s->data);
  keel__free(s);
}

static void notify_cb(uv_timer_t *t) {
  subconn *sc = t->data;
  while (!sc->closing && !keel__rlist_empty(&sc->notify)) {
    keel_redis_sub *s = KEEL__CONTAINER_OF(sc->notify.next, keel_redis_sub, nlink);
    keel__rlist_remove(&s->nlink);
    s->in_notify = false;
    if (s->ending) {
      end_sub(s);
    } else if (s->ch->confirmed) {
      if (s->told != TOLD_READY || s->told_epoch != s->ch->epoch) tell_ready(s);
    } else if (sc->lost && s->told != TOLD_LOST) {
      s->told = TOLD_LOST;
      s->cb(s, KEEL_REDIS_SUB_LOST, sc->lost_status, NULL, s->data);
    }
  }
}

/* ---- public ------------------------------------------------------------------ */

static subconn *sc_get(keel_redis *r) {
  subconn **slot = keel__redis_subconn_slot(r);
  if (*slot != NULL) return *slot;
  subconn *sc = keel__calloc(1, sizeof *sc);
  if (sc == NULL) return NULL;
  sc->r = r;
  sc->loop = keel__redis_loop_of(r);
  keel__rlist_init(&sc->chans);
  keel__rlist_init(&sc->notify);
  keel_rng_seed(&sc->rng, uv_hrtime() ^ ((uint64_t)(uintptr_t)sc << 7));
  uv_timer_init(sc->loop, &sc->conn_timer);
  uv_timer_init(sc->loop, &sc->notify_timer);
  sc->conn_timer.data = sc;
  sc->notify_timer.data = sc;
  keel__redis_handle_opened(r);
  keel__redis_handle_opened(r);
  uv_timer_start(&sc->conn_timer, sc_connect_timer, 0, 0); /* connect on a later iteration */
  *slot = sc;
  return sc;
}

static chan *chan_find(subconn *sc, const char *name, size_t len, bool pattern) {
  for (keel__rlink *c = sc->chans.next; c != &sc->chans; c = c->next) {
    chan *ch = KEEL__CONTAINER_OF(c, chan, link);
    if (ch->pattern == pattern && ch->len == len && memcmp(ch->name, name, len) == 0) return ch;
  }
  return NULL;
}

int keel_redis_subscribe(keel_redis *r, const char *channel, size_t len, bool pattern,
                         keel_redis_sub_cb cb, void *data, keel_redis_sub **out) {
  if (r == NULL || channel == NULL || cb == NULL || out == NULL || len == 0 ||
      len > MAX_CHANNEL_LEN)
    return UV_EINVAL;
  if (keel__redis_closing(r)) return KEEL_ECLOSING;
  subconn *sc = *keel__redis_subconn_slot(r);
  if (sc != NULL && sc->gave_up) return KEEL_ECONN;
  if (sc != NULL && sc->nsubs >= KEEL_REDIS_MAX_SUBSCRIPTIONS) return UV_ENOBUFS;
  keel_redis_sub *s = keel__calloc(1, sizeof *s);
  if (s == NULL) return UV_ENOMEM;
  sc = sc_get(r);
  if (sc == NULL) {
    keel__free(s);
    return UV_ENOMEM;
  }
  chan *ch = chan_find(sc, channel, len, pattern);
  if (ch == NULL) {
    ch = keel__calloc(1, sizeof *ch + len + 1);
    if (ch == NULL) {
      keel__free(s);
      return UV_ENOMEM;
    }
    ch->sc = sc;
    ch->pattern = pattern;
    ch->len = len;
    memcpy(ch->name, channel, len);
    keel__rlist_init(&ch->subs);
    keel__rlist_push(&sc->chans, &ch->link);
  }
  s->sc = sc;
  s->ch = ch;
  s->cb = cb;
  s->data = data;
  keel__rlist_push(&ch->subs, &s->link);
  sc->nsubs++;
  send_sub(sc, ch);
  if (ch->confirmed || sc->lost) schedule_notify(s);
  *out = s;
  return 0;
}

int keel_redis_unsubscribe(keel_redis_sub *s) {
  if (s == NULL) return UV_EINVAL;
  subconn *sc = s->sc;
  if (sc->closing) return KEEL_ECLOSING;
  if (s->ending) return UV_EINVAL;
  chan *ch = s->ch;
  sub_detach(s);
  s->ending = true;
  s->end_status = 0;
  sc->nsubs--;
  if (keel__rlist_empty(&ch->subs)) {
    send_unsub(sc, ch);
    maybe_free_chan(ch);
  }
  schedule_notify(s);
  return 0;
}

void keel_redis_get_pubsub_stats(const keel_redis *r, keel_redis_pubsub_stats *out) {
  if (r == NULL || out == NULL) return;
  const subconn *sc = *keel__redis_subconn_slot((keel_redis *)(uintptr_t)r);
  if (sc == NULL) {
    memset(out, 0, sizeof *out);
    return;
  }
  *out = sc->st;
  out->subscriptions = sc->nsubs;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

/* ---- close ------------------------------------------------------------------ */

static void timer_closed(uv_handle_t *h) {
  subconn *sc = h->data;
  keel__redis_handle_closed(sc->r);
}

void keel__redis_pubsub_closing(keel_redis *r) {
  subconn *sc = *keel__redis_subconn_slot(r);
  if (sc == NULL) return;
  sc->closing = true;
  sc->st.connected = false;
  for (keel__rlink *c = sc->chans.next; c != &sc->chans; c = c->next) {
    chan *ch = KEEL__CONTAINER_OF(c, chan, link);
    while (!keel__rlist_empty(&ch->subs)) {
      keel_redis_sub *s = sub_of(ch->subs.next);
      sub_detach(s);
      s->ending = true;
      s->end_status = UV_ECANCELED;
      sc->nsubs--;
      schedule_notify(s);
    }
  }
  redisAsyncContext *ac = sc->ac;
  sc->ac = NULL;
  if (ac != NULL) redisAsyncFree(ac); /* deferred when inside its callback */
  uv_close((uv_handle_t *)&sc->conn_timer, timer_closed);
  uv_close((uv_handle_t *)&sc->notify_timer, timer_closed);
}

void keel__redis_pubsub_closed(keel_redis *r) {
  subconn **slot = keel__redis_subconn_slot(r);
  subconn *sc = *slot;
  if (sc == NULL) return;
  /* hiredis freed its context (its poll handle is closed): the chans are
   * ours alone. Every subscription is ending; the ENDED calls may not
   * touch sc any more than to be told KEEL_ECLOSING. */
  while (!keel__rlist_empty(&sc->notify)) {
    keel_redis_sub *s = KEEL__CONTAINER_OF(sc->notify.next, keel_redis_sub, nlink);
    keel__rlist_remove(&s->nlink);
    s->in_notify = false;
    end_sub(s);
  }
  while (!keel__rlist_empty(&sc->chans)) {
    chan *ch = KEEL__CONTAINER_OF(sc->chans.next, chan, link);
    keel__rlist_remove(&ch->link);
    keel__free(ch);
  }
  *slot = NULL;
  keel__free(sc);
}
