/* The listener: one keel_pg connection, LISTEN on every channel after each
 * connect, gap reports after a reconnect, parse → route → filter →
 * handlers, fetching rows whose payload was too large, in arrival order. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libpq-fe.h>
#include <sys/time.h>

#include "core/alloc.h"
#include "core/histogram.h"
#include "core/util.h"
#include "listen/listener_stats.h"
#include "keel/listen.h"
#include "listen/change.h"
#include "listen/filter.h"

typedef struct subscription {
  char *schema;
  char *table;
  char *quoted; /* "schema"."table" for row fetches */
  char *channel;
  unsigned events;
  keel__filter filter;
  keel__columns columns; /* from the catalog at the last connect */
} subscription;

typedef struct handler_entry {
  char *id;
  keel_listener_handler fn;
  void *data;
  bool removed;
} handler_entry;

typedef struct raw_channel {
  char *channel;
  keel_listener_channel_cb cb;
  void *data;
} raw_channel;

struct fetch_ctx;

/* A change waiting for its turn (behind a row fetch) or for its row. sub
 * points to a subscription, which is allocated on its own and lives as long
 * as the listener: add_table may grow the array of pointers, never move a
 * subscription. */
typedef struct queued_change {
  struct queued_change *next;
  keel_change change;
  subscription *sub;
  struct fetch_ctx *fetch; /* the row fetch in flight for it, or NULL */
  long raw_index;          /* >= 0: a raw channel's notification held back */
  bool dropped;            /* its overflow row could not be read: not delivered */
  bool ready;
  size_t cap; /* bytes allocated for it, payload included */
  char payload[];
} queued_change;

/* A queued change's block is at least this big (with room for a payload of
 * a few hundred bytes and its working copy), so that the spare one fits the
 * next change: no allocation per change in the steady state. */
#define KEEL__QUEUED_MIN (sizeof(queued_change) + 1024)

/* A row fetch in flight. q is cleared when the change is dropped (stop,
 * close) before the fetch's callback runs, whatever status it then gets. */
typedef struct fetch_ctx {
  struct keel_listener *l;
  queued_change *q;
} fetch_ctx;

struct keel_listener {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_listener_opts opts;
  char *conninfo;
  keel_pg *conn;
  bool started;
  bool active;
  bool ever_active;
  uint64_t down_since_ms;
  unsigned listens_outstanding;
  unsigned checks_outstanding; /* filters being checked against the catalog */
  uint64_t listen_round;       /* LISTENs of other rounds are ignored */
  uint32_t listen_attempt;
  uint64_t listen_last_delay;
  keel_rng rng;
  uv_timer_t *retry_timer; /* retries a failed LISTEN */
  uv_timer_t *beat_timer;  /* asks the server's time while active */
  bool beat_in_flight;
  uint64_t beats;
  bool sweep_again;               /* the last sweep deleted its limit: sweep at the next beat */
  bool holding;                   /* a session is starting: deliver nothing before its gap event */
  int64_t caught_up_us;           /* server time at which every earlier commit had reached us */
  int64_t pending_from_us;        /* the caught-up time when the connection was lost */
  int64_t gap_from_us, gap_to_us; /* the window of the last gap reported */
  bool gap_known;
  unsigned conns_open;
  unsigned handles_open; /* connections and the timer still closing */
  subscription **subs;   /* each allocated on its own: queued changes point to them */
  size_t sub_count;
  handler_entry *handlers;
  size_t handler_count;
  raw_channel *raws;
  size_t raw_count;
  queued_change *queue_head, *queue_tail;
  queued_change *spare;     /* the last block freed, reused by the next change (at most one) */
  queued_change *borrowing; /* its change's raw text is in a result being handled */
  unsigned dispatch_depth;
  bool closing;
  keel_close_cb close_cb;
  void *close_data;
  keel_listener_stats stats;
  keel__histogram latency;
  /* self-probe: a NOTIFY sent on probe_conn must come back on conn */
  keel_pg *probe_conn;
  uv_timer_t *probe_timer; /* next probe, or the deadline of the one out */
  char probe_channel[48];
  uint64_t probe_seq;       /* payload of the last probe sent */
  uint64_t probe_sent_ns;   /* uv_hrtime() when it was sent */
  bool probe_out;           /* sent, not back (nor missed) yet */
  bool probe_committed;     /* its NOTIFY committed: the deadline runs */
  bool deaf;                /* a probe was missed: active again once one comes back */
  bool probe_gate;          /* LISTENs in place, waiting for a probe before going active */
  unsigned misses_in_a_row; /* consecutive misses: every second one reconnects */
  keel__histogram probe_lag;
  char last_error[KEEL__ERRBUF_SIZE];
};

void keel_listener_opts_init(keel_listener_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->events = KEEL_CHANGE_ALL;
  opts->heartbeat_ms = 5000;
  opts->connect_timeout_ms = 5000;
  keel_backoff_full_jitter(&opts->reconnect_backoff, 100, 2.0, 5000);
  opts->probe_interval_ms = 5000;
  opts->probe_timeout_ms = 5000;
}

static uint32_t probe_interval(const keel_listener *l) {
  return l->opts.probe_interval_ms ? l->opts.probe_interval_ms : 5000;
}

static uint32_t probe_timeout(const keel_listener *l) {
  return l->opts.probe_timeout_ms ? l->opts.probe_timeout_ms : 5000;
}

#define KEEL__DAY_US INT64_C(86400000000)

static int64_t wall_us(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
}

/* ---- subscriptions -------------------------------------------------------- */

static void subscription_free(subscription *s) {
  keel__free(s->schema);
  keel__free(s->table);
  keel__free(s->quoted);
  keel__free(s->channel);
  keel__filter_free(&s->filter);
  keel__columns_free(&s->columns);
}

/* Identifier rules: a letter, '_' or a non-ASCII character first, then
 * also digits and '$'; valid UTF-8; 1..63 bytes (NAMEDATALEN - 1). */
int keel_listener_validate_channel(const char *channel, char *why, size_t cap) {
  char local[8];
  if (why == NULL || cap == 0) why = local, cap = sizeof local;
  why[0] = '\0';
  if (channel == NULL) return keel__why(why, cap, UV_EINVAL, "channel: NULL");
  size_t len = strlen(channel);
  if (len == 0) return keel__why(why, cap, UV_EINVAL, "channel: empty");
  if (len > 63) {
    snprintf(why, cap, "channel \"%.63s...\": longer than 63 bytes (%zu)", channel, len);
    return UV_EINVAL;
  }
  const unsigned char *p = (const unsigned char *)channel;
  for (size_t i = 0; i < len;) {
    unsigned char ch = p[i];
    if (ch >= 0x80) {
      size_t n = ch >= 0xF0 && ch <= 0xF4 ? 4 : ch >= 0xE0 ? 3 : ch >= 0xC2 && ch < 0xE0 ? 2 : 0;
      if (n == 0 || i + n > len) goto bad_utf8;
      for (size_t k = 1; k < n; k++)
        if ((p[i + k] & 0xC0) != 0x80) goto bad_utf8;
      i += n;
      continue;
    }
    bool letter = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
    bool later = (ch >= '0' && ch <= '9') || ch == '$';
    if (!letter && !(later && i > 0)) {
      snprintf(why, cap,
               "channel \"%s\": must start with a letter or '_' and contain only letters, "
               "digits, '_' and '$' (byte %zu is '%c')",
               channel, i, ch >= 0x20 && ch < 0x7f ? ch : '?');
      return UV_EINVAL;
    }
    i++;
  }
  return 0;
bad_utf8:
  return keel__why(why, cap, UV_EINVAL, "channel: not valid UTF-8");
}

static int subscription_init(subscription *s, const char *table, unsigned events,
                             const char *filter, const char *channel, char *why, size_t cap) {
  memset(s, 0, sizeof *s);
  char quoted[160];
  if (table == NULL || keel_pg_quote_ident(quoted, sizeof quoted, table, true) < 0) {
    snprintf(why, cap, "invalid table name");
    return UV_EINVAL;
  }
  if (channel != NULL && keel_listener_validate_channel(channel, why, cap) != 0) return UV_EINVAL;
  if (events == 0 || events > KEEL_CHANGE_ALL) {
    snprintf(why, cap, "events must be a mask of KEEL_CHANGE_INSERT/UPDATE/DELETE");
    return UV_EINVAL;
  }
  int rc = keel__filter_parse(&s->filter, filter, why, cap);
  if (rc != 0) return rc;
  const char *dot = strchr(table, '.');
  s->schema = dot ? keel__strndup(table, (size_t)(dot - table)) : keel__strdup("public");
  s->table = keel__strdup(dot ? dot + 1 : table);
  s->quoted = keel__strdup(quoted);
  s->channel = keel__strdup(channel != NULL ? channel : KEEL_LISTEN_DEFAULT_CHANNEL);
  s->events = events;
  if (s->schema == NULL || s->table == NULL || s->quoted == NULL || s->channel == NULL) {
    subscription_free(s);
    snprintf(why, cap, "out of memory");
    return UV_ENOMEM;
  }
  return 0;
}

static int add_subscription(keel_listener *l, const char *table, unsigned events,
                            const char *filter, const char *channel, char *why, size_t cap) {
  subscription *s = keel__malloc(sizeof *s);
  if (s == NULL) return keel__why(why, cap, UV_ENOMEM, "out of memory");
  int rc = subscription_init(s, table, events, filter, channel, why, cap);
  if (rc != 0) {
    keel__free(s);
    return rc;
  }
  subscription **subs = keel__realloc(l->subs, (l->sub_count + 1) * sizeof *subs);
  if (subs == NULL) {
    subscription_free(s);
    keel__free(s);
    return keel__why(why, cap, UV_ENOMEM, "out of memory");
  }
  l->subs = subs;
  l->subs[l->sub_count++] = s;
  return 0;
}

/* ---- delivery ------------------------------------------------------------ */

/* A row the filter reads: one of the change's rows, or its key when the
 * row is gone (a key-only change). */
typedef struct lookup_row {
  keel_change *c;
  const keel__row *row;
} lookup_row;

static const char *row_lookup(void *data, const char *column, bool *present) {
  lookup_row *r = data;
  return keel__change_column(r->c, r->row, column, present);
}

static bool row_matches(const keel__filter *f, keel_change *c, const keel__row *row) {
  if (f->count == 0) return true;
  lookup_row r = {c, row->present ? row : &c->key};
  return keel__filter_match(f, row_lookup, &r);
}

static void compact_handlers(keel_listener *l) {
  size_t kept = 0;
  for (size_t i = 0; i < l->handler_count; i++) {
    if (l->handlers[i].removed) {
      keel__free(l->handlers[i].id);
      continue;
    }
    l->handlers[kept++] = l->handlers[i];
  }
  l->handler_count = kept;
}

static void deliver(keel_listener *l, keel_change *c, subscription *sub) {
  c->columns = sub->columns.count > 0 ? &sub->columns : NULL;
  c->transition = KEEL_CHANGE_INSIDE;
  if (c->op == KEEL_CHANGE_UPDATE && sub->filter.count > 0) {
    /* Both rows decide: a row that moves out of the filter is delivered as
     * leaving it, one that moves in as entering. Without the old row (an
     * oversize change) a new row outside the filter may have left it. */
    bool in_new = row_matches(&sub->filter, c, &c->new_row);
    /* unknown old row: inside when the new row matches, leaving when not */
    bool in_old = c->old_row.present ? row_matches(&sub->filter, c, &c->old_row) : true;
    if (!in_new && !in_old) {
      l->stats.filtered++;
      return;
    }
    if (in_new && !in_old) {
      c->transition = KEEL_CHANGE_ENTER;
      l->stats.entered++;
    } else if (!in_new) {
      c->transition = KEEL_CHANGE_LEAVE;
      l->stats.left++;
    }
  } else if (!row_matches(&sub->filter, c,
                          c->op == KEEL_CHANGE_DELETE ? &c->old_row : &c->new_row)) {
    l->stats.filtered++;
    return;
  }
  /* time_us is within 0..KEEL__CHANGE_MAX_TIME_US (checked by the parser):
   * no overflow here; a latency over a day is recorded as a day. */
  c->latency_us = wall_us() - c->time_us;
  int64_t recorded = c->latency_us < 0              ? 0
                     : c->latency_us > KEEL__DAY_US ? KEEL__DAY_US
                                                    : c->latency_us;
  keel__histogram_record(&l->latency, (uint64_t)recorded * 1000);
  l->stats.delivered++;
  size_t count = l->handler_count; /* handlers added now see the next change */
  l->dispatch_depth++;
  for (size_t i = 0; i < count && !l->closing; i++) {
    handler_entry *h = &l->handlers[i];
    if (!h->removed) h->fn(l, c, h->data);
  }
  l->dispatch_depth--;
  if (l->dispatch_depth == 0) compact_handlers(l);
}

/* A block for a change with payload_bytes after it: the spare one when it
 * is big enough, else a new one. Its fields are not initialised. */
static queued_change *queued_alloc(keel_listener *l, size_t payload_bytes) {
  size_t need = sizeof(queued_change) + payload_bytes;
  queued_change *q = l->spare;
  if (q != NULL && q->cap >= need) {
    l->spare = NULL;
    return q;
  }
  size_t cap = need < KEEL__QUEUED_MIN ? KEEL__QUEUED_MIN : need;
  q = keel__malloc(cap);
  if (q != NULL) q->cap = cap;
  return q;
}

/* Frees a queued change; a fetch still in flight for it forgets it. Its
 * block is kept as the spare when that is the bigger one (a NOTIFY payload
 * is at most 8000 bytes: the spare stays below 17 KB). */
static void queued_free(keel_listener *l, queued_change *q) {
  if (q->fetch != NULL) q->fetch->q = NULL;
  if (q == l->borrowing) l->borrowing = NULL;
  keel__change_free(&q->change);
  if (l->spare == NULL || l->spare->cap < q->cap) {
    keel__free(l->spare);
    l->spare = q;
    return;
  }
  keel__free(q);
}

static void drain_queue(keel_listener *l) {
  while (l->queue_head != NULL && l->queue_head->ready && !l->closing && !l->holding) {
    queued_change *q = l->queue_head;
    l->queue_head = q->next;
    if (l->queue_head == NULL) l->queue_tail = NULL;
    if (q->dropped) {
      /* counted and reported when its overflow row could not be read */
    } else if (q->raw_index >= 0) {
      raw_channel *r = &l->raws[q->raw_index];
      l->stats.raw++;
      r->cb(l, r->channel, q->payload, r->data);
    } else {
      deliver(l, &q->change, q->sub);
    }
    queued_free(l, q);
  }
}

static void enqueue(keel_listener *l, queued_change *q) {
  if (l->queue_tail != NULL)
    l->queue_tail->next = q;
  else
    l->queue_head = q;
  l->queue_tail = q;
}

static void on_row_fetched(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  queued_change *q = data;
  q->ready = true;
  if (status == 0) {
    const char *row = keel_pg_result_value(res, 0, 0);
    char *copy = row != NULL ? keel__strdup(row) : NULL;
    /* kept by the change, freed with it; a row that cannot be read leaves
     * the change with its key only */
    if (copy != NULL) keel__change_set_fetched(&q->change, copy);
  }
}

static void fetch_row(keel_listener *l, queued_change *q);
static void fetch_overflow(keel_listener *l, queued_change *q);
static void sweep_overflow(keel_listener *l);
static void report_error(keel_listener *l, int err);
static void on_listen_retry(uv_timer_t *timer);
static void become_active(keel_listener *l);
static void on_beat(uv_timer_t *timer);
static void begin_session(keel_listener *l);
static void listen_added(keel_listener *l, const char *channel);
static void probe_received(keel_listener *l, const char *payload);
static void on_probe_timer(uv_timer_t *timer);

static void on_notify(keel_pg *conn, const char *channel, const char *payload, int pid,
                      void *data) {
  (void)pid;
  keel_listener *l = data;
  /* Nothing reaches handlers after close, or from a connection stopped
   * earlier. */
  if (l->closing || conn != l->conn) return;
  if (l->probe_channel[0] != '\0' && strcmp(channel, l->probe_channel) == 0) {
    probe_received(l, payload);
    return;
  }
  l->stats.received++;
  for (size_t i = 0; i < l->raw_count; i++) {
    if (strcmp(l->raws[i].channel, channel) != 0) continue;
    if (!l->holding && l->queue_head == NULL) {
      l->stats.raw++;
      l->raws[i].cb(l, channel, payload, l->raws[i].data);
      return;
    }
    /* held back until the session's gap event (or behind a row fetch) */
    size_t payload_len = strlen(payload);
    queued_change *q = queued_alloc(l, payload_len + 1);
    if (q == NULL) {
      keel__fail(l->last_error, UV_ENOMEM, "out of memory: a notification was dropped");
      return;
    }
    memcpy(q->payload, payload, payload_len + 1);
    q->next = NULL;
    q->sub = NULL;
    q->fetch = NULL;
    q->dropped = false;
    q->ready = true;
    q->raw_index = (long)i;
    memset(&q->change, 0, offsetof(keel_change, inline_fields));
    q->change.fields = q->change.inline_fields;
    enqueue(l, q);
    drain_queue(l);
    return;
  }
  /* the payload as received, then a working copy the parser writes into */
  size_t payload_len = strlen(payload);
  queued_change *q = queued_alloc(l, 2 * (payload_len + 1));
  if (q == NULL) {
    keel__fail(l->last_error, UV_ENOMEM, "out of memory: a change was dropped");
    return;
  }
  memcpy(q->payload, payload, payload_len + 1);
  q->next = NULL;
  q->ready = true;
  q->sub = NULL;
  q->fetch = NULL;
  q->raw_index = -1;
  q->dropped = false;
  char *work = q->payload + payload_len + 1;
  memcpy(work, payload, payload_len + 1);
  int rc = keel__change_parse_in(&q->change, q->payload, work, l->last_error, sizeof l->last_error);
  if (rc == 0) {
    for (size_t i = 0; i < l->sub_count; i++) {
      subscription *s = l->subs[i];
      if (strcmp(s->channel, channel) == 0 && strcmp(s->table, q->change.table) == 0 &&
          strcmp(s->schema, q->change.schema) == 0 && (s->events & q->change.op)) {
        q->sub = s;
        break;
      }
    }
  }
  if (rc != 0 || q->sub == NULL) {
    if (rc != 0)
      l->stats.malformed++;
    else
      l->stats.filtered++;
    queued_free(l, q);
    return;
  }
  enqueue(l, q);
  if (q->change.overflow_id > 0)
    fetch_overflow(l, q);
  else if (q->change.key_only && q->change.op != KEEL_CHANGE_DELETE)
    fetch_row(l, q); /* a trigger installed before the overflow table */
  drain_queue(l);
}

static void on_fetch_done(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  fetch_ctx *f = data;
  keel_listener *l = f->l;
  queued_change *q = f->q;
  keel__free(f);
  /* The change was dropped (stop or close) while its fetch was in flight:
   * whatever the status (UV_ECANCELED, a lost connection's KEEL_ECONN or
   * KEEL_EINDOUBT, ...), there is nothing left to fill in. */
  if (q == NULL) return;
  q->fetch = NULL;
  on_row_fetched(conn, status, res, q);
  if (status != 0)
    keel__fail(l->last_error, status, "fetching an oversize row: %s", keel_pg_last_error(conn));
  if (!l->closing) drain_queue(l);
}

/* A change too large for NOTIFY, as it was when it changed: read by primary
 * key from keel_overflow (the trigger wrote it in the same transaction). */
static void on_overflow_done(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  fetch_ctx *f = data;
  keel_listener *l = f->l;
  queued_change *q = f->q;
  keel__free(f);
  if (q == NULL) return; /* dropped by stop / close meanwhile */
  q->fetch = NULL;
  q->ready = true;
  /* One copy of the row's text, parsed in place; keel_change_json's text
   * stays in the result while it lasts (the change is normally delivered
   * below, inside this callback) and is copied only when it is not. */
  const char *payload = status == 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  char *copy = payload != NULL ? keel__strdup(payload) : NULL;
  int rc = copy != NULL ? keel__change_set_overflow_in(&q->change, payload, copy, l->last_error,
                                                       sizeof l->last_error)
                        : (status != 0       ? status
                           : payload == NULL ? KEEL_ENOTFOUND
                                             : UV_ENOMEM);
  if (copy != NULL) l->borrowing = q; /* cleared if q is freed meanwhile */
  if (rc != 0) {
    /* Delivered as notified (operation, table, time, the key when it fit):
     * handlers learn that the row changed, not how (has_new and has_old are
     * false). A parse failure has left the change empty: dropped. */
    if (copy != NULL) {
      q->dropped = true;
      l->stats.malformed++;
    } else {
      keel__fail(l->last_error, rc, "an oversize change could not be read from keel_overflow: %s",
                 status != 0 ? keel_pg_last_error(conn) : "no such row (swept?)");
    }
    report_error(l, rc);
  }
  if (!l->closing) drain_queue(l);
  if (l->borrowing != NULL) {
    /* Still queued (held behind a gap event, or closing): the result goes
     * away after this callback. Without memory for a copy, the change's
     * JSON is the notification's. */
    if (keel__change_own_raw(&l->borrowing->change) != 0)
      l->borrowing->change.raw = l->borrowing->payload;
    l->borrowing = NULL;
  }
}

static void fetch_overflow(keel_listener *l, queued_change *q) {
  char id[32];
  snprintf(id, sizeof id, "%lld", (long long)q->change.overflow_id);
  const char *values[] = {id};
  fetch_ctx *f = keel__malloc(sizeof *f);
  if (f != NULL) {
    f->l = l;
    f->q = q;
    if (keel_pg_query_cached(l->conn, "SELECT payload FROM public.keel_overflow WHERE id = $1", 1,
                             values, on_overflow_done, f) == 0) {
      q->fetch = f;
      q->ready = false;
      l->stats.fetched++;
      return;
    }
    keel__free(f);
  }
  q->dropped = true;
  l->stats.malformed++;
  keel__fail(l->last_error, UV_ENOMEM, "out of memory: an oversize change was dropped");
}

static void fetch_row(keel_listener *l, queued_change *q) {
  /* WHERE k1::text = $1 AND k2::text = $2 ... from the change's key. */
  char sql[1024];
  const char *values[8];
  int n = snprintf(sql, sizeof sql, "SELECT row_to_json(t)::text FROM %s t WHERE ", q->sub->quoted);
  int params = 0;
  q->change.columns = q->sub->columns.count > 0 ? &q->sub->columns : NULL;
  for (uint32_t k = 0; k < q->change.key.count; k++) {
    const char *column = q->change.fields[q->change.key.first + k].name;
    char quoted[160];
    if (params == 8 || keel_pg_quote_ident(quoted, sizeof quoted, column, false) < 0) break;
    /* the key's text form, as t.col::text prints it */
    values[params] = keel__change_column(&q->change, &q->change.key, column, NULL);
    n += snprintf(sql + n, sizeof sql - (size_t)n, "%s t.%s::text IS NOT DISTINCT FROM $%d",
                  params ? " AND" : "", quoted, params + 1);
    params++;
    if ((size_t)n >= sizeof sql) break;
  }
  fetch_ctx *f = keel__malloc(sizeof *f);
  if (params == 0 || (size_t)n >= sizeof sql || f == NULL) {
    keel__free(f);
    return; /* delivered with the key only */
  }
  f->l = l;
  f->q = q;
  if (keel_pg_query(l->conn, sql, params, values, on_fetch_done, f) != 0) {
    keel__free(f);
    return; /* delivered with the key only */
  }
  q->fetch = f;
  q->ready = false;
  l->stats.fetched++;
}

/* ---- connection ----------------------------------------------------------- */

static void report_error(keel_listener *l, int err) {
  if (l->opts.on_error == NULL || l->closing) return;
  l->opts.on_error(l, err, l->last_error, l->opts.data);
}

/* One LISTEN in flight; round tells a LISTEN of an earlier session (or of an
 * earlier round on this one) from the current ones. */
typedef struct listen_ctx {
  keel_listener *l;
  uint64_t round;
  bool beat; /* a heartbeat's time query */
} listen_ctx;

static void listen_retry_later(keel_listener *l) {
  l->listen_attempt++;
  uint64_t delay = keel_backoff_delay(&l->opts.reconnect_backoff, l->listen_attempt,
                                      l->listen_last_delay, &l->rng);
  l->listen_last_delay = delay;
  uv_timer_start(l->retry_timer, on_listen_retry, delay, 0);
}

static void on_listen_done(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  listen_ctx *ctx = data;
  keel_listener *l = ctx->l;
  uint64_t round = ctx->round;
  keel__free(ctx);
  if (l->closing || conn != l->conn || round != l->listen_round) return;
  if (status != 0) {
    /* A lost connection reconnects and LISTENs again by itself; anything
     * else (a server error, a statement that could not be sent) leaves the
     * listener inactive, says why, and tries again after a backoff. */
    if (!keel_pg_is_connected(conn)) return;
    l->listen_round++; /* the rest of this round no longer counts */
    l->active = false;
    keel__fail(l->last_error, status, "LISTEN failed (retrying): %s", keel_pg_last_error(conn));
    listen_retry_later(l);
    report_error(l, status);
    return;
  }
  if (l->listens_outstanding == 0 || --l->listens_outstanding > 0) return;
  become_active(l);
}

/* Every LISTEN is in place and the server's time `now_us` was read after
 * them: report the gap (its window ends at now_us), then deliver what was
 * held back. */
static void become_active_at(keel_listener *l, int64_t now_us) {
  l->active = true;
  l->ever_active = true;
  l->listen_attempt = 0;
  l->listen_last_delay = 0;
  l->caught_up_us = now_us;
  if (l->down_since_ms != 0) {
    uint64_t gap = uv_now(l->loop) - l->down_since_ms;
    l->down_since_ms = 0;
    l->gap_from_us = l->pending_from_us;
    l->gap_to_us = now_us;
    l->gap_known = true;
    l->stats.gaps++;
    if (l->opts.on_gap != NULL) l->opts.on_gap(l, gap, l->opts.data);
    if (l->closing) return;
  }
  l->holding = false;
  uv_timer_start(l->beat_timer, on_beat, l->opts.heartbeat_ms > 0 ? l->opts.heartbeat_ms : 5000,
                 l->opts.heartbeat_ms > 0 ? l->opts.heartbeat_ms : 5000);
  /* the first probe of the session at once, then every probe_interval_ms */
  if (l->probe_conn != NULL && !l->probe_out) uv_timer_start(l->probe_timer, on_probe_timer, 0, 0);
  drain_queue(l);
}

/* The server's clock, µs since the epoch. */
static const char server_time_sql[] =
    "SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8";

static void on_server_time(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  listen_ctx *ctx = data;
  keel_listener *l = ctx->l;
  uint64_t round = ctx->round;
  bool beat = ctx->beat;
  keel__free(ctx);
  if (beat) l->beat_in_flight = false;
  if (l->closing || conn != l->conn || round != l->listen_round) return;
  const char *text = status == 0 ? keel_pg_result_value(res, 0, 0) : NULL;
  int64_t now_us = text != NULL ? (int64_t)strtoll(text, NULL, 10) : 0;
  if (beat) {
    /* every notification committed before this moment has reached us */
    if (now_us > l->caught_up_us) l->caught_up_us = now_us;
    return;
  }
  if (status != 0 || now_us <= 0) {
    if (!keel_pg_is_connected(conn)) return; /* the next connect starts over */
    now_us = wall_us();                      /* the best this side knows */
  }
  become_active_at(l, now_us);
}

static int ask_server_time(keel_listener *l, bool beat) {
  listen_ctx *ctx = keel__malloc(sizeof *ctx);
  if (ctx == NULL) return UV_ENOMEM;
  ctx->l = l;
  ctx->round = l->listen_round;
  ctx->beat = beat;
  int rc = keel_pg_query(l->conn, server_time_sql, 0, NULL, on_server_time, ctx);
  if (rc != 0) keel__free(ctx);
  return rc;
}

static void on_beat(uv_timer_t *timer) {
  keel_listener *l = timer->data;
  if (l->closing || !l->active || l->beat_in_flight || l->conn == NULL) return;
  if (ask_server_time(l, true) == 0) l->beat_in_flight = true;
  bool sweep = ++l->beats % 120 == 0 || l->sweep_again;
  if (l->sub_count > 0 && sweep) {
    l->sweep_again = false;
    sweep_overflow(l);
  }
}

static void activate(keel_listener *l) {
  /* the server's time after the LISTENs: where the new session's coverage
   * begins (the gap window's end) */
  if (ask_server_time(l, false) != 0) become_active_at(l, wall_us());
}

/* ---- self-probe ------------------------------------------------------------ */

static void probe_send(keel_listener *l);

static void on_probe_timer(uv_timer_t *timer) {
  keel_listener *l = timer->data;
  if (l->closing || l->conn == NULL) return;
  if (l->probe_out) {
    if (l->probe_committed) {
      /* committed probe_timeout_ms ago and not back: deaf */
      l->stats.probes_missed++;
      l->stats.hearing = false;
      l->probe_out = false;
      l->probe_gate = false;
      l->deaf = true;
      l->active = false;
      l->listen_round++; /* LISTENs and checks of this round no longer count */
      l->listens_outstanding = 0;
      l->checks_outstanding = 0;
      l->holding = true; /* nothing is delivered before the gap event */
      uv_timer_stop(l->beat_timer);
      if (l->ever_active && l->down_since_ms == 0) {
        l->down_since_ms = uv_now(l->loop);
        l->pending_from_us = l->caught_up_us;
      }
      keel__fail(l->last_error, KEEL_ENOTHEARING,
                 "not hearing: its own NOTIFY on \"%s\" did not arrive within %u ms (a "
                 "transaction pooler, a proxy that dropped LISTEN or a misrouted connection? the "
                 "listener needs a direct or session-pooled connection); listening again",
                 l->probe_channel, (unsigned)probe_timeout(l));
      report_error(l, KEEL_ENOTHEARING);
      if (l->closing || l->conn == NULL) return;
      if (++l->misses_in_a_row % 2 == 0)
        (void)keel_pg_reset(l->conn); /* a new session: on_state LISTENs again */
      else
        listen_retry_later(l);
    }
    return;
  }
  if (l->active || l->probe_gate) probe_send(l);
}

typedef struct probe_ctx {
  keel_listener *l;
  uint64_t seq;
} probe_ctx;

static void on_probe_sent(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  (void)res;
  probe_ctx *ctx = data;
  keel_listener *l = ctx->l;
  uint64_t seq = ctx->seq;
  keel__free(ctx);
  if (l->closing) return;
  if (status == 0) l->stats.probes_sent++;
  if (!l->probe_out || seq != l->probe_seq || l->conn == NULL) return;
  if (status != 0) {
    /* not sent: nothing can be judged; try again after the interval */
    l->probe_out = false;
    if (l->active || l->probe_gate)
      uv_timer_start(l->probe_timer, on_probe_timer, probe_interval(l), 0);
    return;
  }
  l->probe_committed = true;
  uv_timer_start(l->probe_timer, on_probe_timer, probe_timeout(l), 0);
}

static void probe_send(keel_listener *l) {
  if (l->probe_conn == NULL || l->probe_out) return;
  probe_ctx *ctx = keel__malloc(sizeof *ctx);
  char payload[24];
  snprintf(payload, sizeof payload, "%llu", (unsigned long long)(l->probe_seq + 1));
  const char *values[] = {l->probe_channel, payload};
  if (ctx == NULL || (*ctx = (probe_ctx){l, l->probe_seq + 1},
                      keel_pg_query(l->probe_conn, "SELECT pg_catalog.pg_notify($1, $2)", 2, values,
                                    on_probe_sent, ctx)) != 0) {
    keel__free(ctx);
    uv_timer_start(l->probe_timer, on_probe_timer, probe_interval(l), 0);
    return;
  }
  l->probe_seq++;
  l->probe_out = true;
  l->probe_committed = false;
  l->probe_sent_ns = uv_hrtime();
  uv_timer_stop(l->probe_timer); /* armed with the deadline once committed */
}

static void probe_received(keel_listener *l, const char *payload) {
  char *end = NULL;
  unsigned long long seq = strtoull(payload, &end, 10);
  if (end == payload || *end != '\0') return; /* not ours */
  l->stats.probes_received++;
  if (!l->probe_out || seq != l->probe_seq) return; /* a late one, already judged */
  uint64_t lag = uv_hrtime() - l->probe_sent_ns;
  keel__histogram_record(&l->probe_lag, lag);
  l->stats.probe_lag_last_us = (double)lag / 1000.0;
  l->stats.hearing = true;
  l->probe_out = false;
  l->misses_in_a_row = 0;
  uv_timer_start(l->probe_timer, on_probe_timer, probe_interval(l), 0);
  if (l->probe_gate) {
    l->probe_gate = false;
    l->deaf = false;
    activate(l);
  }
}

/* Every LISTEN is in place. After a missed probe, a probe must come back
 * first. */
static void become_active(keel_listener *l) {
  if (l->deaf && l->probe_conn != NULL) {
    l->probe_gate = true;
    if (!l->probe_out) probe_send(l);
    return;
  }
  activate(l);
}

static int send_listen(keel_listener *l, const char *channel) {
  char sql[200], quoted[160];
  if (keel_pg_quote_ident(quoted, sizeof quoted, channel, false) < 0) return UV_EINVAL;
  snprintf(sql, sizeof sql, "LISTEN %s", quoted);
  listen_ctx *ctx = keel__malloc(sizeof *ctx);
  if (ctx == NULL) return UV_ENOMEM;
  ctx->l = l;
  ctx->round = l->listen_round;
  ctx->beat = false;
  int rc = keel_pg_query(l->conn, sql, 0, NULL, on_listen_done, ctx);
  if (rc != 0) {
    keel__free(ctx);
    return rc;
  }
  l->listens_outstanding++;
  return 0;
}

static bool channel_seen(keel_listener *l, size_t sub_index, const char *channel) {
  for (size_t i = 0; i < sub_index; i++)
    if (strcmp(l->subs[i]->channel, channel) == 0) return true;
  return false;
}

/* Sends a LISTEN for every channel; active once all have succeeded. */
static void listen_everything(keel_listener *l) {
  l->listen_round++;
  l->listens_outstanding = 0;
  int rc = 0;
  for (size_t i = 0; i < l->sub_count && rc == 0; i++)
    if (!channel_seen(l, i, l->subs[i]->channel)) rc = send_listen(l, l->subs[i]->channel);
  for (size_t i = 0; i < l->raw_count && rc == 0; i++) rc = send_listen(l, l->raws[i].channel);
  if (rc == 0 && l->probe_conn != NULL) rc = send_listen(l, l->probe_channel);
  if (rc != 0) {
    l->listen_round++; /* what was sent of this round no longer counts */
    l->active = false;
    keel__fail(l->last_error, rc, "LISTEN could not be sent (retrying): %s", keel_strerror(rc));
    listen_retry_later(l);
    report_error(l, rc);
    return;
  }
  if (l->listens_outstanding == 0) become_active(l);
}

/* ---- filters checked against the catalog at every connect --------------- */

/* One subscription's check in flight (columns, then its literals). */
typedef struct check_ctx {
  keel_listener *l;
  uint64_t round;
  subscription *sub;
} check_ctx;

/* name, type, base type oid, array element's base type oid (0 when not an
 * array), the element type's delimiter */
static const char catalog_sql[] =
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), "
    "(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)::int8, "
    "(CASE WHEN b.typcategory = 'A' THEN b.typelem ELSE 0 END)::int8, "
    "coalesce((SELECT e.typdelim FROM pg_type e WHERE e.oid = b.typelem), ',') "
    "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
    "JOIN pg_type b ON b.oid = (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END) "
    "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum";

enum {
  OID_BOOL = 16,
  OID_JSON = 114,
  OID_FLOAT4 = 700,
  OID_FLOAT8 = 701,
  OID_JSONB = 3802,
  OID_TIMESTAMP = 1114,
  OID_TIMESTAMPTZ = 1184
};

static keel__form form_of(unsigned oid) {
  switch (oid) {
    case OID_TIMESTAMP:
      return KEEL__FORM_TIMESTAMP;
    case OID_TIMESTAMPTZ:
      return KEEL__FORM_TIMESTAMPTZ;
    case OID_FLOAT4:
      return KEEL__FORM_FLOAT4;
    case OID_FLOAT8:
      return KEEL__FORM_FLOAT8;
    case OID_JSON:
    case OID_JSONB:
      return KEEL__FORM_JSON;
    default:
      return KEEL__FORM_AS_IS;
  }
}

/* Reads the catalog's rows into cols. Returns 0 or UV_ENOMEM. */
static int read_columns(const keel_pg_result *res, keel__columns *cols) {
  int rows = keel_pg_result_nrows(res);
  cols->items = rows > 0 ? keel__calloc((size_t)rows, sizeof *cols->items) : NULL;
  cols->count = 0;
  cols->as_is = false;
  if (rows > 0 && cols->items == NULL) return UV_ENOMEM;
  bool as_is = true;
  for (int r = 0; r < rows; r++) {
    keel__column *col = &cols->items[cols->count];
    col->name = keel__strdup(keel_pg_result_value(res, r, 0));
    col->type = keel__strdup(keel_pg_result_value(res, r, 1));
    cols->count++;
    if (col->name == NULL || col->type == NULL) {
      keel__columns_free(cols);
      return UV_ENOMEM;
    }
    unsigned oid = (unsigned)strtoul(keel_pg_result_value(res, r, 2), NULL, 10);
    unsigned element = (unsigned)strtoul(keel_pg_result_value(res, r, 3), NULL, 10);
    const char *delim = keel_pg_result_value(res, r, 4);
    col->type_oid = oid;
    col->form = element != 0 ? KEEL__FORM_ARRAY : form_of(oid);
    col->element = form_of(element) == KEEL__FORM_JSON ? KEEL__FORM_AS_IS : form_of(element);
    col->element_bool = element == OID_BOOL;
    col->element_json = element == OID_JSON || element == OID_JSONB;
    col->delim = delim != NULL && delim[0] != '\0' ? delim[0] : ',';
    if (col->form != KEEL__FORM_AS_IS) as_is = false;
  }
  cols->as_is = as_is;
  return 0;
}

/* A filter the table cannot answer: the listener stays inactive and says
 * why; the next connect (or stop/start) checks again. */
static void refuse(keel_listener *l, const char *fmt, const char *a, const char *b) {
  l->listen_round++;
  l->checks_outstanding = 0;
  l->active = false;
  l->holding = false; /* nothing waits for a session that will not start */
  keel__fail(l->last_error, UV_EINVAL, fmt, a, b);
  report_error(l, UV_EINVAL);
  drain_queue(l); /* what the LISTENs already in place brought */
}

static bool check_current(keel_listener *l, keel_pg *conn, check_ctx *ctx) {
  return !l->closing && conn == l->conn && ctx->round == l->listen_round;
}

static void check_passed(keel_listener *l) {
  if (l->checks_outstanding > 0 && --l->checks_outstanding == 0) listen_everything(l);
}

/* Lost connection: the next connect checks again. Anything else that is not
 * an answer (no memory, a timeout) is retried like a failed LISTEN. */
static void check_failed(keel_listener *l, keel_pg *conn, int status, const char *what) {
  if (!keel_pg_is_connected(conn)) return;
  l->listen_round++;
  l->checks_outstanding = 0;
  l->active = false;
  keel__fail(l->last_error, status, "checking the filter (%s, retrying): %s", what,
             keel_strerror(status));
  listen_retry_later(l);
  report_error(l, status);
}

static void on_literals_checked(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  check_ctx *ctx = data;
  keel_listener *l = ctx->l;
  if (!check_current(l, conn, ctx)) {
    keel__free(ctx);
    return;
  }
  if (status == KEEL_EPG) {
    refuse(l, "filter on %s: a value does not fit its column: %s", ctx->sub->quoted,
           keel_pg_last_error(conn));
  } else if (status != 0) {
    check_failed(l, conn, status, ctx->sub->quoted);
  } else {
    /* each literal's canonical text, in the order they were sent: the
     * evaluator compares column values with these, typed */
    keel__filter *f = &ctx->sub->filter;
    int column = 0, ncols = keel_pg_result_ncols(res);
    for (size_t i = 0; i < f->count; i++) {
      keel__filter_term *t = &f->terms[i];
      if (t->value_count == 0) continue;
      const char *small[16];
      const char **canon =
          t->value_count <= 16 ? small : keel__calloc(t->value_count, sizeof *canon);
      int rc = canon != NULL ? 0 : UV_ENOMEM;
      for (size_t v = 0; rc == 0 && v < t->value_count; v++, column++)
        canon[v] = column < ncols ? keel_pg_result_value(res, 0, column) : NULL;
      const keel__column *col = keel__columns_find(&ctx->sub->columns, t->column);
      if (rc == 0)
        rc = keel__filter_set_typed(t, keel__filter_cmp_of(col != NULL ? col->type_oid : 0), canon);
      if (canon != small) keel__free(canon);
      if (rc != 0) {
        check_failed(l, conn, rc, ctx->sub->quoted);
        keel__free(ctx);
        return;
      }
    }
    check_passed(l);
  }
  keel__free(ctx);
}

/* SELECT $1::type1, $2::type2, ... over every literal of the filter: the
 * server's own input functions judge them. Returns 1 when sent, 0 when
 * there is nothing to check, or an error. */
static int check_literals(keel_listener *l, check_ctx *ctx) {
  keel__filter *f = &ctx->sub->filter;
  size_t count = 0, len = 16;
  for (size_t i = 0; i < f->count; i++) {
    count += f->terms[i].value_count;
    len += f->terms[i].value_count * (strlen(f->terms[i].type) + 16);
  }
  if (count == 0) return 0;
  if (count > 4096) count = 4096;
  char *sql = keel__malloc(len);
  const char **values = keel__calloc(count, sizeof *values);
  if (sql == NULL || values == NULL) {
    keel__free(sql);
    keel__free(values);
    return UV_ENOMEM;
  }
  size_t at = (size_t)snprintf(sql, len, "SELECT ");
  size_t n = 0;
  for (size_t i = 0; i < f->count; i++) {
    for (size_t v = 0; v < f->terms[i].value_count && n < count; v++) {
      values[n] = f->terms[i].values[v];
      at += (size_t)snprintf(sql + at, len - at, "%s$%zu::%s", n > 0 ? ", " : "", n + 1,
                             f->terms[i].type);
      n++;
    }
  }
  int rc = keel_pg_query(l->conn, sql, (int)n, values, on_literals_checked, ctx);
  keel__free(sql);
  keel__free(values);
  return rc == 0 ? 1 : rc;
}

static void on_columns(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  check_ctx *ctx = data;
  keel_listener *l = ctx->l;
  if (!check_current(l, conn, ctx)) {
    keel__free(ctx);
    return;
  }
  subscription *s = ctx->sub;
  if (status == KEEL_EPG && s->filter.count == 0) {
    /* no such table (yet): without a filter there is nothing to refuse;
     * its values are delivered as sent */
    keel__columns_free(&s->columns);
    check_passed(l);
    keel__free(ctx);
    return;
  }
  if (status != 0) {
    if (status == KEEL_EPG)
      refuse(l, "table %s: %s", s->quoted, keel_pg_last_error(conn));
    else
      check_failed(l, conn, status, s->quoted);
    keel__free(ctx);
    return;
  }
  keel__columns columns;
  if (read_columns(res, &columns) != 0) {
    check_failed(l, conn, UV_ENOMEM, s->quoted);
    keel__free(ctx);
    return;
  }
  keel__columns_free(&s->columns);
  s->columns = columns;
  int rows = keel_pg_result_nrows(res);
  for (size_t i = 0; i < s->filter.count; i++) {
    keel__filter_term *t = &s->filter.terms[i];
    const char *type = NULL;
    for (int r = 0; r < rows && type == NULL; r++)
      if (strcmp(keel_pg_result_value(res, r, 0), t->column) == 0)
        type = keel_pg_result_value(res, r, 1);
    if (type == NULL) {
      refuse(l, "filter on %s: no column \"%s\"", s->quoted, t->column);
      keel__free(ctx);
      return;
    }
    if ((t->op == KEEL__F_IS_TRUE || t->op == KEEL__F_IS_FALSE || t->op == KEEL__F_IS_UNKNOWN) &&
        strcmp(type, "boolean") != 0) {
      refuse(l,
             "filter on %s: is.true / is.false / is.unknown need a boolean column, \"%s\" is not",
             s->quoted, t->column);
      keel__free(ctx);
      return;
    }
    const keel__column *col = keel__columns_find(&s->columns, t->column);
    keel__cmp cmp = keel__filter_cmp_of(col != NULL ? col->type_oid : 0);
    if (!keel__filter_op_supported(t->op, cmp)) {
      refuse(l,
             "filter on %s: lt/lte/gt/gte are not supported on column \"%s\" (keel knows no "
             "order for its type)",
             s->quoted, t->column);
      keel__free(ctx);
      return;
    }
    /* typed once the literals' canonical texts are in */
    if (t->value_count == 0 && keel__filter_set_typed(t, cmp, NULL) != 0) {
      check_failed(l, conn, UV_ENOMEM, s->quoted);
      keel__free(ctx);
      return;
    }
    char *copy = keel__strdup(type);
    if (copy == NULL) {
      check_failed(l, conn, UV_ENOMEM, s->quoted);
      keel__free(ctx);
      return;
    }
    keel__free(t->type);
    t->type = copy;
  }
  int rc = check_literals(l, ctx);
  if (rc == 1) return; /* ctx goes on to on_literals_checked */
  if (rc < 0)
    check_failed(l, conn, rc, s->quoted);
  else
    check_passed(l);
  keel__free(ctx);
}

/* Sends the catalog check of one subscription. Returns 0 or an error. */
static int check_subscription(keel_listener *l, subscription *s) {
  check_ctx *ctx = keel__malloc(sizeof *ctx);
  if (ctx == NULL) return UV_ENOMEM;
  *ctx = (check_ctx){l, l->listen_round, s};
  const char *params[] = {s->quoted};
  int rc = keel_pg_query(l->conn, catalog_sql, 1, params, on_columns, ctx);
  if (rc != 0) keel__free(ctx);
  return rc;
}

/* After each connect: check every filtered subscription against the
 * catalog, then LISTEN. */
/* Overflow rows every listener has had time to read (ten minutes: a
 * listener away longer is inside a gap anyway). Errors are ignored (no
 * overflow table: a trigger from before it; no DELETE right). */
/* Rows of keel_overflow deleted per sweep at most: each sweep is a short
 * statement (the session's statements have a deadline), oldest ids first
 * through the primary key; one that deletes its limit is followed by
 * another at the next heartbeat. */
#define KEEL__SWEEP_ROWS 2000 /* the LIMIT in sweep_overflow() */

static void on_swept(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  keel_listener *l = data;
  if (l->closing || conn != l->conn) return;
  if (status == 0 && keel_pg_result_affected(res) >= KEEL__SWEEP_ROWS) l->sweep_again = true;
}

static void sweep_overflow(keel_listener *l) {
  keel_pg_query(l->conn,
                "DELETE FROM public.keel_overflow WHERE id IN (SELECT id FROM public.keel_overflow"
                " WHERE created < now() - interval '10 minutes' ORDER BY id LIMIT 2000)",
                0, NULL, on_swept, l);
}

static void begin_session(keel_listener *l) {
  l->listen_round++;
  l->holding = true;
  if (l->sub_count > 0) sweep_overflow(l);
  l->checks_outstanding = 0;
  for (size_t i = 0; i < l->sub_count; i++) {
    int rc = check_subscription(l, l->subs[i]);
    if (rc != 0) {
      check_failed(l, l->conn, rc, l->subs[i]->quoted);
      return;
    }
    l->checks_outstanding++;
  }
  if (l->checks_outstanding == 0) listen_everything(l);
}

static void on_listen_retry(uv_timer_t *timer) {
  keel_listener *l = timer->data;
  if (l->closing || l->conn == NULL || !keel_pg_is_connected(l->conn)) return;
  begin_session(l);
}

static void on_state(keel_pg *conn, bool up, int status, void *data) {
  keel_listener *l = data;
  /* l->conn is still NULL while keel_pg_new() runs; a connection stopped
   * earlier may still report. */
  if (l->closing || (l->conn != NULL && conn != l->conn)) return;
  if (up) {
    if (l->ever_active) l->stats.reconnects++;
    begin_session(l);
    return;
  }
  uv_timer_stop(l->retry_timer);
  uv_timer_stop(l->beat_timer);
  uv_timer_stop(l->probe_timer);
  l->probe_out = l->probe_gate = false;
  if (l->ever_active && l->down_since_ms == 0) {
    l->down_since_ms = uv_now(l->loop);
    /* changes committed after the last moment we knew we were caught up
     * may be lost */
    l->pending_from_us = l->caught_up_us;
  }
  l->active = false;
  l->listen_round++;
  keel__fail(l->last_error, status, "listener connection down: %s", keel_pg_last_error(conn));
}

static void free_listener(keel_listener *l);
static void on_conn_closed(void *object, void *data);

static void on_handle_closed(uv_handle_t *handle) {
  keel_listener *l = handle->data;
  keel__free(handle);
  if (--l->handles_open == 0 && l->closing) free_listener(l);
}

int keel_listener_new_ex(uv_loop_t *loop, const keel_listener_opts *opts, keel_listener **out,
                         char *why_buf, size_t why_cap) {
  char why_local[KEEL__ERRBUF_SIZE];
  char *why = why_buf != NULL && why_cap > 0 ? why_buf : why_local;
  size_t cap = why_buf != NULL && why_cap > 0 ? why_cap : sizeof why_local;
  why[0] = '\0';
  if (loop == NULL || opts == NULL || out == NULL || opts->conninfo == NULL) {
    snprintf(why, cap, "loop, opts, out and opts->conninfo are required");
    return UV_EINVAL;
  }
  if (keel_backoff_validate(&opts->reconnect_backoff, NULL) != 0) {
    snprintf(why, cap, "invalid reconnect_backoff");
    return UV_EINVAL;
  }
  keel_listener *l = keel__calloc(1, sizeof *l);
  if (l == NULL) return keel__why(why, cap, UV_ENOMEM, "out of memory");
  l->loop = loop;
  l->opts = *opts;
  keel_rng_seed(&l->rng, (uint64_t)(uintptr_t)l ^ uv_hrtime());
  l->conninfo = keel__strdup(opts->conninfo);
  l->retry_timer = keel__malloc(sizeof *l->retry_timer);
  l->beat_timer = keel__malloc(sizeof *l->beat_timer);
  l->probe_timer = keel__malloc(sizeof *l->probe_timer);
  if (l->conninfo == NULL || l->retry_timer == NULL || l->beat_timer == NULL ||
      l->probe_timer == NULL) {
    keel__free(l->retry_timer);
    keel__free(l->beat_timer);
    keel__free(l->probe_timer);
    keel__free(l->conninfo);
    keel__free(l);
    return keel__why(why, cap, UV_ENOMEM, "out of memory");
  }
  l->opts.conninfo = l->conninfo;
  l->opts.table = l->opts.filter = l->opts.channel = NULL;
  if (opts->table != NULL) {
    int rc = add_subscription(l, opts->table, opts->events, opts->filter, opts->channel, why, cap);
    if (rc != 0) {
      keel__free(l->retry_timer);
      keel__free(l->beat_timer);
      keel__free(l->probe_timer);
      keel__free(l->conninfo);
      keel__free(l);
      return rc;
    }
  }
  uv_timer_init(loop, l->retry_timer);
  l->retry_timer->data = l;
  uv_timer_init(loop, l->beat_timer);
  l->beat_timer->data = l;
  uv_timer_init(loop, l->probe_timer);
  l->probe_timer->data = l;
  l->handles_open = 3;
  /* the probe's channel: only this listener LISTENs to it */
  uint64_t r[2];
  if (uv_random(NULL, NULL, r, sizeof r, 0, NULL) != 0) {
    r[0] = keel_rng_next(&l->rng);
    r[1] = keel_rng_next(&l->rng) ^ (uint64_t)uv_os_getpid();
  }
  snprintf(l->probe_channel, sizeof l->probe_channel, "keel_probe_%016llx%016llx",
           (unsigned long long)r[0], (unsigned long long)r[1]);
  *out = l;
  return 0;
}

int keel_listener_new(uv_loop_t *loop, const keel_listener_opts *opts, keel_listener **out) {
  return keel_listener_new_ex(loop, opts, out, NULL, 0);
}

int keel_listener_add_table(keel_listener *l, const char *table, unsigned events,
                            const char *filter, const char *channel) {
  if (l == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  int rc = add_subscription(l, table, events, filter, channel, l->last_error, sizeof l->last_error);
  if (rc != 0 || l->conn == NULL || !keel_pg_is_connected(l->conn)) return rc;
  subscription *added = l->subs[l->sub_count - 1];
  {
    /* Check every filter and LISTEN again (LISTEN twice is harmless);
     * inactive until done. */
    l->active = false;
    uv_timer_stop(l->retry_timer);
    begin_session(l);
    return 0;
  }
  if (!channel_seen(l, l->sub_count - 1, added->channel)) listen_added(l, added->channel);
  return 0;
}

/* A channel added while connected: LISTEN now, inactive until it is done. */
static void listen_added(keel_listener *l, const char *channel) {
  if (l->listens_outstanding == 0 && !l->active) return; /* a retry or reconnect will do it */
  int rc = send_listen(l, channel);
  if (rc == 0) {
    l->active = false;
    return;
  }
  l->listen_round++;
  l->active = false;
  keel__fail(l->last_error, rc, "LISTEN could not be sent (retrying): %s", keel_strerror(rc));
  listen_retry_later(l);
}

int keel_listener_listen_channel(keel_listener *l, const char *channel, keel_listener_channel_cb cb,
                                 void *data) {
  if (l == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  if (cb == NULL)
    return keel__fail(l->last_error, UV_EINVAL, "keel_listener_listen_channel: cb is required");
  char why[KEEL__ERRBUF_SIZE];
  if (keel_listener_validate_channel(channel, why, sizeof why) != 0)
    return keel__fail(l->last_error, UV_EINVAL, "%s", why);
  raw_channel *raws = keel__realloc(l->raws, (l->raw_count + 1) * sizeof *raws);
  if (raws == NULL) return keel__fail(l->last_error, UV_ENOMEM, "out of memory");
  l->raws = raws;
  char *copy = keel__strdup(channel);
  if (copy == NULL) return keel__fail(l->last_error, UV_ENOMEM, "out of memory");
  l->raws[l->raw_count++] = (raw_channel){copy, cb, data};
  if (l->conn != NULL && keel_pg_is_connected(l->conn)) listen_added(l, copy);
  return 0;
}

int keel_listener_on(keel_listener *l, const char *id, keel_listener_handler handler, void *data) {
  if (l == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  if (id == NULL || handler == NULL)
    return keel__fail(l->last_error, UV_EINVAL, "keel_listener_on: id and handler are required");
  for (size_t i = 0; i < l->handler_count; i++) {
    handler_entry *h = &l->handlers[i];
    if (!h->removed && strcmp(h->id, id) == 0) {
      h->fn = handler; /* the same id replaces, like the seed's onChange */
      h->data = data;
      return 0;
    }
  }
  handler_entry *handlers = keel__realloc(l->handlers, (l->handler_count + 1) * sizeof *handlers);
  if (handlers == NULL) return keel__fail(l->last_error, UV_ENOMEM, "out of memory");
  l->handlers = handlers;
  char *copy = keel__strdup(id);
  if (copy == NULL) return keel__fail(l->last_error, UV_ENOMEM, "out of memory");
  l->handlers[l->handler_count++] = (handler_entry){copy, handler, data, false};
  return 0;
}

int keel_listener_off(keel_listener *l, const char *id) {
  if (l == NULL || id == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  for (size_t i = 0; i < l->handler_count; i++) {
    handler_entry *h = &l->handlers[i];
    if (!h->removed && strcmp(h->id, id) == 0) {
      h->removed = true; /* lazily: a dispatch may be walking the array */
      if (l->dispatch_depth == 0) compact_handlers(l);
      return 0;
    }
  }
  return KEEL_ENOTFOUND;
}

/* The listener's conninfo with application_name + "/probe", so that the
 * probe's session is told from the listener's in pg_stat_activity. NULL
 * when it cannot be parsed or on OOM (the conninfo is then used as is). */
static char *probe_conninfo(const char *conninfo) {
  PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
  if (opts == NULL) return NULL;
  size_t cap = 64;
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++)
    if (o->val != NULL) cap += strlen(o->keyword) + 2 * strlen(o->val) + 8;
  char *out = keel__malloc(cap);
  size_t at = 0;
  for (PQconninfoOption *o = opts; out != NULL && o->keyword != NULL; o++) {
    bool app = strcmp(o->keyword, "application_name") == 0;
    if (o->val == NULL && !app) continue;
    const char *val = o->val != NULL ? o->val : "";
    at += (size_t)snprintf(out + at, cap - at, "%s='", o->keyword);
    for (const char *c = val; *c; c++) {
      if (*c == '\'' || *c == '\\') out[at++] = '\\';
      out[at++] = *c;
    }
    if (app) {
      at += (size_t)snprintf(out + at, cap - at, "/probe");
    }
    at += (size_t)snprintf(out + at, cap - at, "' ");
  }
  if (out != NULL) out[at] = '\0';
  PQconninfoFree(opts);
  return out;
}

int keel_listener_start(keel_listener *l) {
  if (l == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  if (l->started) return 0;
  keel_pg_opts o;
  keel_pg_opts_init(&o);
  o.conninfo = l->conninfo;
  o.connect_timeout_ms = l->opts.connect_timeout_ms;
  o.health_check_interval_ms = l->opts.heartbeat_ms;
  /* Every statement of the session (the heartbeat's, the LISTENs) must
   * answer within connect_timeout_ms, or the session is reset: a server
   * that stopped answering while its socket stays up (a stopped backend, a
   * proxy holding a dead connection) is otherwise never noticed, since the
   * heartbeat keeps the session from looking idle to keel_pg's own check. */
  o.query_timeout_ms = l->opts.connect_timeout_ms > 0 ? l->opts.connect_timeout_ms : 5000;
  o.reconnect_backoff = l->opts.reconnect_backoff;
  o.on_state = on_state;
  o.on_notify = on_notify;
  o.data = l;
  keel_pg *conn = NULL, *probe = NULL;
  int rc = keel_pg_new(l->loop, &o, &conn);
  if (rc != 0) return keel__fail(l->last_error, rc, "cannot create the connection");
  if (!l->opts.no_probe) {
    /* the probe's sender: another session, as a writer's would be */
    o.on_state = NULL;
    o.on_notify = NULL;
    o.data = NULL;
    o.health_check_interval_ms = 0;
    o.query_timeout_ms = probe_timeout(l);
    char *named = probe_conninfo(l->conninfo);
    if (named != NULL) o.conninfo = named;
    rc = keel_pg_new(l->loop, &o, &probe);
    keel__free(named);
    if (rc != 0) {
      l->conns_open++;
      l->handles_open++;
      keel_pg_close(conn, on_conn_closed, l);
      return keel__fail(l->last_error, rc, "cannot create the probe connection");
    }
    l->conns_open++;
    l->handles_open++;
  }
  l->conn = conn;
  l->probe_conn = probe;
  l->probe_out = l->probe_gate = false;
  l->conns_open++;
  l->handles_open++;
  l->started = true;
  return 0;
}

static void free_queue(keel_listener *l) {
  queued_change *q = l->queue_head;
  while (q != NULL) {
    queued_change *next = q->next;
    queued_free(l, q);
    q = next;
  }
  l->queue_head = l->queue_tail = NULL;
  keel__free(l->spare);
  l->spare = NULL;
}

static void free_listener(keel_listener *l) {
  keel_close_cb cb = l->close_cb;
  void *data = l->close_data;
  free_queue(l);
  for (size_t i = 0; i < l->sub_count; i++) {
    subscription_free(l->subs[i]);
    keel__free(l->subs[i]);
  }
  for (size_t i = 0; i < l->handler_count; i++) keel__free(l->handlers[i].id);
  for (size_t i = 0; i < l->raw_count; i++) keel__free(l->raws[i].channel);
  keel__free(l->subs);
  keel__free(l->handlers);
  keel__free(l->raws);
  keel__free(l->conninfo);
  keel__free(l);
  if (cb != NULL) cb(l, data);
}

static void on_conn_closed(void *object, void *data) {
  (void)object;
  keel_listener *l = data;
  l->conns_open--;
  if (--l->handles_open == 0 && l->closing) free_listener(l);
}

static void disconnect(keel_listener *l) {
  /* A listener that had been caught up misses what commits until its next
   * start, and drops what it received but did not deliver: that start
   * reports the gap, from the last moment it knew it was caught up or the
   * oldest change dropped here, whichever is earlier. */
  if (l->ever_active || l->down_since_ms != 0) {
    int64_t from_us = l->down_since_ms != 0 ? l->pending_from_us : l->caught_up_us;
    for (queued_change *q = l->queue_head; q != NULL; q = q->next)
      if (q->change.time_us > 0 && q->change.time_us < from_us) from_us = q->change.time_us;
    if (l->down_since_ms == 0) l->down_since_ms = uv_now(l->loop);
    l->pending_from_us = from_us;
  }
  keel_pg *conn = l->conn;
  l->conn = NULL;
  l->started = false;
  l->active = false;
  l->ever_active = false;
  l->listen_round++;
  l->listens_outstanding = 0;
  l->holding = false;
  l->beat_in_flight = false;
  uv_timer_stop(l->retry_timer);
  uv_timer_stop(l->beat_timer);
  uv_timer_stop(l->probe_timer);
  l->probe_out = l->probe_gate = false;
  l->deaf = false;
  l->misses_in_a_row = 0;
  l->stats.hearing = false;
  keel_pg_close(conn, on_conn_closed, l);
  if (l->probe_conn != NULL) keel_pg_close(l->probe_conn, on_conn_closed, l);
  l->probe_conn = NULL;
  /* Changes waiting for a row fetch are dropped; their fetches forget them. */
  free_queue(l);
}

int keel_listener_stop(keel_listener *l) {
  if (l == NULL) return UV_EINVAL;
  if (l->closing) return KEEL_ECLOSING;
  if (l->started) disconnect(l);
  return 0;
}

bool keel_listener_is_active(const keel_listener *l) {
  return l != NULL && l->active;
}

void keel_listener_get_stats(const keel_listener *l, keel_listener_stats *out) {
  if (l == NULL || out == NULL) return;
  *out = l->stats;
  out->latency_p50_us = keel__histogram_quantile(&l->latency, 0.50) / 1000.0;
  out->latency_p99_us = keel__histogram_quantile(&l->latency, 0.99) / 1000.0;
  out->latency_max_us = (double)l->latency.max_ns / 1000.0;
  out->active = l->active;
  out->probe_lag_p50_us = keel__histogram_quantile(&l->probe_lag, 0.50) / 1000.0;
  out->probe_lag_p99_us = keel__histogram_quantile(&l->probe_lag, 0.99) / 1000.0;
}

int keel_listener_gap_window(const keel_listener *l, int64_t *from_us, int64_t *to_us) {
  if (l == NULL) return UV_EINVAL;
  if (!l->gap_known) return KEEL_ENOTFOUND;
  if (from_us != NULL) *from_us = l->gap_from_us;
  if (to_us != NULL) *to_us = l->gap_to_us;
  return 0;
}

const char *keel_listener_last_error(const keel_listener *l) {
  return l == NULL ? "listener is NULL" : l->last_error;
}

void keel_listener_close(keel_listener *l, keel_close_cb cb, void *data) {
  if (l == NULL || l->closing) return;
  keel__stats_hooks_detach(&l->stats_hooks);
  l->closing = true;
  l->close_cb = cb;
  l->close_data = data;
  if (l->started) disconnect(l);
  uv_timer_stop(l->retry_timer);
  /* Frees the listener from the timers' close callbacks (a later iteration)
   * or when the last connection is closed, whichever comes last. */
  uv_close((uv_handle_t *)l->retry_timer, on_handle_closed);
  uv_close((uv_handle_t *)l->beat_timer, on_handle_closed);
  uv_close((uv_handle_t *)l->probe_timer, on_handle_closed);
}

keel__stats_hooks *keel__listener_stats_hooks(keel_listener *l) {
  return l->closing ? NULL : &l->stats_hooks; /* no registration once closing */
}

const keel__histogram *keel__listener_histogram(const keel_listener *l) {
  return &l->latency;
}
