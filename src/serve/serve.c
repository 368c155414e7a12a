/* The server: libwebsockets on the caller's libuv loop (foreign loop),
 * routing GET /, /metrics, /stats.json and the /ws WebSocket.
 *
 * libwebsockets 4.1 and foreign loops: lws_context_destroy() starts the
 * teardown: it closes the libuv handles of every connection; when their
 * close callbacks have run, lws closes its own timers and idle handle (one
 * iteration later). With a foreign loop lws then waits for a second
 * lws_context_destroy(), which frees everything and unloads the libuv
 * event-lib plugin at once: called while an lws close callback is still
 * pending, the loop later jumps into unmapped code. keel_serve_close()
 * therefore makes the second call from an idle handle, only once the loop
 * has no handle left in the closing state for two iterations in a row
 * (uv_walk), then closes its own handles and calls the user's close
 * callback. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <libwebsockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/util.h"
#include "serve/http_head.h"
#include "serve/serve_internal.h"

#define KEEL__SERVE_MAX_REMOVED 4096

extern const char keel__serve_page[];
extern const size_t keel__serve_page_len;

struct keel_stats_reg {
  keel__stats_hook hook; /* linked into the object's hooks (adapters only) */
  keel_serve *s;
  const keel_stats_source *src;
  const void *obj;
  char *name;
  char *label; /* name escaped for a Prometheus label */
  size_t label_len;
  uint64_t id;
  keel__buf json; /* WebSocket entry as of the last refresh; len 0 before the first */
  keel_stats_reg *next, *prev;
};

/* A WebSocket frame shared by every client it goes to: LWS_PRE bytes of
 * room, then the payload. Freed (or kept for reuse) with its last ref. */
typedef struct frame frame;
struct frame {
  unsigned refs;
  keel__buf b;
  frame *next_free;
};

#define KEEL__FRAME_POOL 4

typedef struct conn conn;
struct conn {
  keel_serve *s;
  struct lws *wsi;
  bool is_ws;
  /* WebSocket: the frame being written (from off), the one queued behind
   * it; a client that falls two frames behind gets a snapshot instead. */
  frame *cur, *queued;
  size_t off;
  bool need_snapshot; /* the next frame is a full snapshot */
  bool behind;        /* deltas are being dropped until that snapshot */
  conn *next, *prev;
};

typedef struct hconn hconn;

struct keel_serve {
  uv_loop_t *loop;
  struct lws_context *ctx;
  int listen_fd;
  uv_poll_t lpoll;    /* the listening socket: keel accepts */
  bool accept_paused; /* out of descriptors: accepting again on the next sweep */
  uv_timer_t sweep;   /* closes HTTP connections past their deadline */
  hconn *http;        /* HTTP connections (WebSocket ones belong to lws) */
  char *host;
  char *token;
  keel_serve_opts opts;
  int port;
  keel_stats_reg *regs, *regs_tail;
  uint64_t next_id;
  uint64_t *removed;
  size_t nremoved, capremoved;
  bool removed_overflow; /* too many removals: everyone gets a snapshot */
  conn *ws;
  uv_timer_t tick;
  uv_idle_t slice;        /* runs a refresh pass in slices of bounded time */
  uv_prepare_t iter;      /* resets the write budget once per loop iteration */
  uint64_t iter_spent_ns; /* spent writing WebSocket chunks this iteration */
  uv_idle_t destroy_idle;
  int quiet_iterations; /* closing: iterations seen with no handle closing */
  bool ticking;
  /* The refresh pass: every object's JSON entry is rendered again, a slice
   * at a time, and the changed ones appended to the delta being built. */
  bool pass_active;
  keel_stats_reg *cursor; /* next object of the pass */
  frame *delta;           /* the delta being built */
  bool delta_empty;       /* nothing appended to "changed" yet */
  keel__buf scratch;      /* one object's JSON, compared with its entry */
  uint64_t seq;           /* of the last delta sent */
  frame *free_frames;
  unsigned nfree_frames;
  frame *snapshot; /* of seq snapshot_seq, while current */
  uint64_t snapshot_seq;
  /* Kept between renders: in a VM a page fault costs tens of microseconds,
   * and a fresh megabyte-sized buffer per scrape faults on every page. */
  keel_stats_writer prom; /* its families and their sample buffers */
  keel__buf spare;        /* a body buffer to reuse (len 0) */
  keel_serve_stats st;
  bool closing;
  int handles;
  keel_close_cb close_cb;
  void *close_data;
};

/* ---- options --------------------------------------------------------- */

void keel_serve_opts_init(keel_serve_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->host = "127.0.0.1";
  opts->port = 9464;
  opts->max_clients = 64;
  opts->max_request_bytes = 4096;
  opts->ws_interval_ms = 500;
  opts->ws_max_frame_bytes = 4u << 20;
  opts->request_timeout_s = 5;
}

/* ---- registrations --------------------------------------------------- */

static bool valid_kind(const char *k) {
  size_t n = strlen(k);
  if (n == 0 || n > 32 || !(k[0] >= 'a' && k[0] <= 'z')) return false;
  for (size_t i = 0; i < n; i++) {
    char c = k[i];
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return false;
  }
  return true;
}

static bool valid_utf8(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  size_t i = 0;
  while (i < n) {
    unsigned c = p[i];
    size_t k;
    if (c < 0x80)
      k = 0;
    else if ((c & 0xE0) == 0xC0 && c >= 0xC2)
      k = 1;
    else if ((c & 0xF0) == 0xE0)
      k = 2;
    else if ((c & 0xF8) == 0xF0 && c <= 0xF4)
      k = 3;
    else
      return false;
    if (c == 0) return false;
    if (i + k >= n + (k == 0 ? 1 : 0) && k > 0 && i + k >= n) return false;
    for (size_t j = 1; j <= k; j++)
      if ((p[i + j] & 0xC0) != 0x80) return false;
    i += k + 1;
  }
  return true;
}

static void reg_free(keel_stats_reg *r) {
  keel__free(r->name);
  keel__free(r->label);
  keel__buf_free(&r->json);
  keel__free(r);
}

static void note_removed(keel_serve *s, uint64_t id) {
  if (s->ws == NULL || s->removed_overflow) return;
  if (s->nremoved == s->capremoved) {
    size_t cap = s->capremoved ? s->capremoved * 2 : 16;
    uint64_t *r =
        cap <= KEEL__SERVE_MAX_REMOVED ? keel__realloc(s->removed, cap * sizeof *r) : NULL;
    if (r == NULL) {
      s->removed_overflow = true; /* every client gets a snapshot at the next tick */
      return;
    }
    s->removed = r;
    s->capremoved = cap;
  }
  s->removed[s->nremoved++] = id;
}

/* Unlinks r from the server and frees it. */
static void reg_drop(keel_stats_reg *r) {
  keel_serve *s = r->s;
  keel__stats_hook_unlink(&r->hook);
  if (s->cursor == r) s->cursor = r->next;
  if (r->prev)
    r->prev->next = r->next;
  else
    s->regs = r->next;
  if (r->next)
    r->next->prev = r->prev;
  else
    s->regs_tail = r->prev;
  s->st.registered--;
  if (r->json.len != 0) note_removed(s, r->id);
  reg_free(r);
}

static void reg_on_detach(keel__stats_hook *hook) {
  keel_stats_reg *r = KEEL__CONTAINER_OF(hook, keel_stats_reg, hook);
  reg_drop(r);
}

int keel_serve_register(keel_serve *s, const keel_stats_source *src, const void *obj,
                        const char *name, keel_stats_reg **reg_out) {
  if (s == NULL || src == NULL || src->kind == NULL || src->write == NULL || obj == NULL ||
      name == NULL)
    return UV_EINVAL;
  if (s->closing) return KEEL_ECLOSING;
  size_t nlen = strlen(name);
  if (!valid_kind(src->kind) || nlen == 0 || nlen > 128 || !valid_utf8(name, nlen))
    return UV_EINVAL;
  for (keel_stats_reg *r = s->regs; r; r = r->next)
    if (strcmp(r->src->kind, src->kind) == 0 && strcmp(r->name, name) == 0) return KEEL_ECONFLICT;
  keel_stats_reg *r = keel__calloc(1, sizeof *r);
  if (r == NULL) return UV_ENOMEM;
  r->name = keel__strdup(name);
  keel__buf lb = {0};
  keel__buf_label_escape(&lb, name);
  if (r->name == NULL || lb.failed || lb.data == NULL) {
    keel__buf_free(&lb);
    reg_free(r);
    return UV_ENOMEM;
  }
  r->label = lb.data;
  r->label_len = lb.len;
  r->s = s;
  r->src = src;
  r->obj = obj;
  r->id = ++s->next_id;
  r->prev = s->regs_tail;
  if (s->regs_tail)
    s->regs_tail->next = r;
  else
    s->regs = r;
  s->regs_tail = r;
  s->st.registered++;
  if (reg_out) *reg_out = r;
  return 0;
}

int keel__serve_register_hooked(struct keel_serve *s, const struct keel_stats_source *src,
                                const void *obj, const char *name, keel__stats_hooks *hooks) {
  if (hooks == NULL) return KEEL_ECLOSING; /* the object's accessor: its close began */
  keel_stats_reg *r;
  int rc = keel_serve_register(s, src, obj, name, &r);
  if (rc != 0) return rc;
  r->hook.detach = reg_on_detach;
  keel__stats_hook_link(hooks, &r->hook);
  return 0;
}

void keel_serve_unregister(keel_stats_reg *reg) {
  if (reg == NULL) return;
  reg_drop(reg);
}

/* ---- rendering ------------------------------------------------------- */

static void serve_source_write(const void *obj, keel_stats_writer *w) {
  const keel_serve *s = obj;
  keel_stats_counter(w, "requests", "HTTP requests answered (any status).", s->st.requests);
  keel_stats_counter(w, "responses_4xx", "HTTP 400, 401, 404 and 405 answers.",
                     s->st.responses_4xx);
  keel_stats_counter(w, "unauthorized", "Requests and WebSocket handshakes refused for the token.",
                     s->st.unauthorized);
  keel_stats_counter(w, "refused", "Connections refused over max_clients.", s->st.refused);
  keel_stats_counter(w, "ws_accepted", "WebSocket clients accepted.", s->st.ws_accepted);
  keel_stats_counter(w, "ws_frames_sent", "WebSocket frames written.", s->st.frames_sent);
  keel_stats_counter(w, "ws_frames_dropped",
                     "WebSocket deltas a slow client did not get (replaced by a snapshot).",
                     s->st.frames_dropped);
  keel_stats_counter(w, "sent_bytes", "HTTP body and WebSocket frame bytes written.",
                     s->st.bytes_sent);
  keel_stats_gauge(w, "clients", "Connections open now.", s->st.clients);
  keel_stats_gauge(w, "ws_clients", "WebSocket clients now.", s->st.ws_clients);
  keel_stats_gauge(w, "registered_objects", "Objects registered.", s->st.registered);
}

static const keel_stats_source serve_source = {"serve", serve_source_write};

/* Renders /metrics into out (which may already hold room in front). */
static int render_metrics(keel_serve *s, keel__buf *out) {
  keel_stats_writer *w = &s->prom;
  if (w->mode != KEEL__W_PROM) keel__writer_init(w, KEEL__W_PROM);
  keel__writer_prom_reset(w);
  keel__writer_prom_object(w, serve_source.kind, "server", 6);
  serve_source.write(s, w);
  for (keel_stats_reg *r = s->regs; r; r = r->next) {
    keel__writer_prom_object(w, r->src->kind, r->label, r->label_len);
    r->src->write(r->obj, w);
  }
  keel__buf_puts(out,
                 "# HELP keel_build_info keel library version (always 1).\n"
                 "# TYPE keel_build_info gauge\nkeel_build_info{version=\"");
  keel__buf_label_escape(out, keel_version_string());
  keel__buf_puts(out, "\"} 1\n");
  keel__writer_prom_finish(w, out);
  return w->failed || out->failed ? UV_ENOMEM : 0;
}

/* A body buffer: the spare one when there is one. */
static keel__buf take_buf(keel_serve *s) {
  keel__buf b = s->spare;
  memset(&s->spare, 0, sizeof s->spare);
  b.len = 0;
  b.failed = false;
  return b;
}

/* Gives a body buffer back (kept as the spare when none is, up to 16 MiB). */
static void give_buf(keel_serve *s, char *data, size_t cap) {
  if (data == NULL) return;
  if (s->spare.data == NULL && cap <= (16u << 20) && !s->closing) {
    s->spare.data = data;
    s->spare.cap = cap;
    s->spare.len = 0;
    return;
  }
  keel__free(data);
}

static int render_json(keel_serve *s, keel__buf *out) {
  keel__buf_puts(out, "{\"version\":");
  keel__buf_json_str(out, keel_version_string());
  keel__buf_puts(out, ",\"time_ms\":");
  keel__buf_u64(out, uv_now(s->loop));
  keel__buf_puts(out, ",\"interval_ms\":");
  keel__buf_u64(out, s->opts.ws_interval_ms);
  keel__buf_puts(out, ",\"server\":");
  keel__json_object(out, &serve_source, s, NULL, 0);
  keel__buf_puts(out, ",\"objects\":[");
  for (keel_stats_reg *r = s->regs; r; r = r->next) {
    if (r != s->regs) keel__buf_put(out, ",", 1);
    keel__json_object(out, r->src, r->obj, r->name, 0);
  }
  keel__buf_puts(out, "]}");
  return out->failed ? UV_ENOMEM : 0;
}

int keel_serve_metrics_text(keel_serve *s, char **text_out, size_t *len_out) {
  if (s == NULL || text_out == NULL) return UV_EINVAL;
  keel__buf b = {0};
  int rc = render_metrics(s, &b);
  if (rc != 0 || b.data == NULL) {
    keel__buf_free(&b);
    return UV_ENOMEM;
  }
  *text_out = b.data;
  if (len_out) *len_out = b.len;
  return 0;
}

int keel_serve_stats_json(keel_serve *s, char **text_out, size_t *len_out) {
  if (s == NULL || text_out == NULL) return UV_EINVAL;
  keel__buf b = {0};
  int rc = render_json(s, &b);
  if (rc != 0 || b.data == NULL) {
    keel__buf_free(&b);
    return UV_ENOMEM;
  }
  *text_out = b.data;
  if (len_out) *len_out = b.len;
  return 0;
}

void keel_serve_get_stats(const keel_serve *s, keel_serve_stats *out) {
  if (s == NULL || out == NULL) return;
  *out = s->st;
  memset(out->reserved_, 0, sizeof out->reserved_);
}

int keel_serve_port(const keel_serve *s) {
  return s ? s->port : -1;
}

/* ---- sending --------------------------------------------------------- */

static const char lws_room[LWS_PRE] = {0};

#define KEEL__CHUNK (64u << 10)

/* How much to hand lws in one write. The socket's free send space is not
 * known (SO_SNDBUF minus SIOCOUTQ overstates it on loopback); 64 KiB is
 * usually taken whole, and when it is not, lws copies at most that much
 * into a buffer of its own until the socket drains. */
static size_t chunk_size(size_t left) {
  return left < KEEL__CHUNK ? left : KEEL__CHUNK;
}

/* ---- WebSocket frames ------------------------------------------------ */

static frame *frame_new(keel_serve *s) {
  frame *f = s->free_frames;
  if (f != NULL) {
    s->free_frames = f->next_free;
    s->nfree_frames--;
  } else {
    f = keel__calloc(1, sizeof *f);
    if (f == NULL) return NULL;
  }
  f->refs = 1;
  f->b.len = 0;
  f->b.failed = false;
  keel__buf_put(&f->b, lws_room, LWS_PRE);
  if (f->b.failed) {
    keel__buf_free(&f->b);
    keel__free(f);
    return NULL;
  }
  return f;
}

static void frame_unref(keel_serve *s, frame *f) {
  if (f == NULL || --f->refs > 0) return;
  if (!s->closing && s->nfree_frames < KEEL__FRAME_POOL && f->b.cap <= (16u << 20)) {
    f->next_free = s->free_frames;
    s->free_frames = f;
    s->nfree_frames++;
    return;
  }
  keel__buf_free(&f->b);
  keel__free(f);
}

static void frame_head(keel_serve *s, keel__buf *b, const char *type, uint64_t seq) {
  keel__buf_puts(b, "{\"type\":\"");
  keel__buf_puts(b, type);
  keel__buf_puts(b, "\",\"seq\":");
  keel__buf_u64(b, seq);
  keel__buf_puts(b, ",\"time_ms\":");
  keel__buf_u64(b, uv_now(s->loop));
  keel__buf_puts(b, ",\"interval_ms\":");
  keel__buf_u64(b, s->opts.ws_interval_ms);
}

/* The snapshot as of the last delta (built once per seq, shared). */
static frame *snapshot(keel_serve *s) {
  if (s->snapshot != NULL && s->snapshot_seq == s->seq) return s->snapshot;
  frame_unref(s, s->snapshot);
  s->snapshot = NULL;
  frame *f = frame_new(s);
  if (f == NULL) return NULL;
  keel__buf *b = &f->b;
  frame_head(s, b, "snapshot", s->seq);
  keel__buf_puts(b, ",\"objects\":[");
  bool first = true;
  for (keel_stats_reg *r = s->regs; r; r = r->next) {
    if (r->json.len == 0) continue; /* registered after the last pass: next delta */
    if (!first) keel__buf_put(b, ",", 1);
    keel__buf_put(b, r->json.data, r->json.len);
    first = false;
  }
  keel__buf_puts(b, "]}");
  if (b->failed) {
    frame_unref(s, f);
    return NULL;
  }
  s->snapshot = f;
  s->snapshot_seq = s->seq;
  return f;
}

static void ws_want_write(conn *c) {
  lws_callback_on_writable(c->wsi);
}

/* Hands the finished delta to every client. */
static void distribute(keel_serve *s, frame *f, bool all_snapshot) {
  for (conn *c = s->ws; c; c = c->next) {
    if (c->cur == NULL && c->queued != NULL) { /* keep the order */
      c->cur = c->queued;
      c->queued = NULL;
      c->off = 0;
    }
    if (all_snapshot && !c->need_snapshot) {
      c->need_snapshot = true;
      frame_unref(s, c->queued);
      c->queued = NULL;
    }
    if (c->need_snapshot) {
      if (c->behind) s->st.frames_dropped++;
      if (c->cur == NULL) ws_want_write(c);
      continue;
    }
    if (c->cur == NULL) {
      f->refs++;
      c->cur = f;
      c->off = 0;
      ws_want_write(c);
    } else if (c->queued == NULL) {
      f->refs++;
      c->queued = f;
    } else { /* two frames behind: drop both, a snapshot follows */
      frame_unref(s, c->queued);
      c->queued = NULL;
      c->need_snapshot = true;
      c->behind = true;
      s->st.frames_dropped += 2;
    }
  }
}

/* Ends the refresh pass: closes the delta, sends it. */
static void pass_end(keel_serve *s) {
  s->pass_active = false;
  uv_idle_stop(&s->slice);
  frame *f = s->delta;
  s->delta = NULL;
  keel__buf *b = &f->b;
  keel__buf_puts(b, "],\"removed\":[");
  for (size_t i = 0; i < s->nremoved; i++) {
    if (i) keel__buf_put(b, ",", 1);
    keel__buf_u64(b, s->removed[i]);
  }
  keel__buf_puts(b, "]}");
  bool all_snapshot = s->removed_overflow || b->failed;
  s->nremoved = 0;
  s->removed_overflow = false;
  s->seq++;
  distribute(s, f, all_snapshot);
  frame_unref(s, f);
}

#define KEEL__SLICE_NS 250000u

/* One slice of the pass: objects until about 250 us have gone. */
static void pass_slice(keel_serve *s) {
  uint64_t t0 = uv_hrtime();
  unsigned n = 0;
  keel__buf *d = &s->delta->b;
  while (s->cursor != NULL) {
    keel_stats_reg *r = s->cursor;
    s->cursor = r->next;
    keel__buf *x = &s->scratch;
    x->len = 0;
    x->failed = false;
    if (keel__json_object(x, r->src, r->obj, r->name, r->id) &&
        (x->len != r->json.len || memcmp(x->data, r->json.data, x->len) != 0)) {
      keel__buf t = r->json; /* swap: both buffers keep their capacity */
      r->json = *x;
      *x = t;
      if (!s->delta_empty) keel__buf_put(d, ",", 1);
      keel__buf_put(d, r->json.data, r->json.len);
      s->delta_empty = false;
    }
    if (++n % 16 == 0 && uv_hrtime() - t0 > KEEL__SLICE_NS) return;
  }
  pass_end(s);
}

static void on_slice(uv_idle_t *idle) {
  pass_slice(idle->data);
}

static void on_tick(uv_timer_t *t) {
  keel_serve *s = t->data;
  if (s->pass_active) return; /* the last one is not done: skip this tick */
  frame *f = frame_new(s);
  if (f == NULL) return; /* tried again next tick */
  frame_head(s, &f->b, "delta", s->seq + 1);
  keel__buf_puts(&f->b, ",\"changed\":[");
  s->delta = f;
  s->delta_empty = true;
  s->cursor = s->regs;
  s->pass_active = true;
  uv_idle_start(&s->slice, on_slice);
  pass_slice(s);
}

/* Abandons a pass (no client left, or close). */
static void pass_stop(keel_serve *s) {
  if (!s->pass_active) return;
  s->pass_active = false;
  uv_idle_stop(&s->slice);
  frame_unref(s, s->delta);
  s->delta = NULL;
  s->cursor = NULL;
}

static void ws_start_ticking(keel_serve *s) {
  if (s->ticking) return;
  s->ticking = true;
  on_tick(&s->tick); /* the first client's snapshot waits for this pass */
  uv_timer_start(&s->tick, on_tick, s->opts.ws_interval_ms, s->opts.ws_interval_ms);
}

/* WebSocket writes one loop iteration may spend: libuv runs the callbacks
 * of every ready socket before it looks at timers again, so 100 clients
 * each given a chunk in one iteration would hold the loop for
 * milliseconds. Over budget, a client waits for the next iteration. */
#define KEEL__ITER_BUDGET_NS 250000u

static void on_iter(uv_prepare_t *p) {
  ((keel_serve *)p->data)->iter_spent_ns = 0;
}

/* Writes the next chunk of the client's frame (one chunk per callback). */
static int ws_write(conn *c) {
  keel_serve *s = c->s;
  if (s->iter_spent_ns > KEEL__ITER_BUDGET_NS) {
    ws_want_write(c);
    return 0;
  }
  if (c->cur == NULL) {
    if (c->queued != NULL) {
      c->cur = c->queued;
      c->queued = NULL;
    } else if (c->need_snapshot && !s->pass_active) {
      frame *f = snapshot(s);
      if (f == NULL) return 0; /* no memory: tried again next tick */
      f->refs++;
      c->cur = f;
      c->need_snapshot = false;
      c->behind = false;
    } else {
      return 0;
    }
    c->off = 0;
    if (c->cur->b.failed || c->cur->b.len - LWS_PRE > s->opts.ws_max_frame_bytes) {
      s->st.frames_dropped++;
      frame_unref(s, c->cur);
      c->cur = NULL;
      frame_unref(s, c->queued);
      c->queued = NULL;
      c->need_snapshot = true;
      c->behind = true;
      return 0;
    }
  }
  keel__buf *b = &c->cur->b;
  size_t len = b->len - LWS_PRE, left = len - c->off;
  size_t n = chunk_size(left);
  int flags = c->off == 0 ? LWS_WRITE_TEXT : LWS_WRITE_CONTINUATION;
  if (n < left) flags |= LWS_WRITE_NO_FIN;
  /* lws writes the frame header into the LWS_PRE bytes in front of the
   * chunk: room, or payload other clients still need; put them back. */
  unsigned char *p = (unsigned char *)b->data + LWS_PRE + c->off;
  unsigned char saved[LWS_PRE];
  memcpy(saved, p - LWS_PRE, LWS_PRE);
  uint64_t t0 = uv_hrtime();
  int m = lws_write(c->wsi, p, n, (enum lws_write_protocol)flags);
  s->iter_spent_ns += uv_hrtime() - t0;
  memcpy(p - LWS_PRE, saved, LWS_PRE);
  if (m < 0) return -1;
  s->st.bytes_sent += n;
  c->off += n;
  if (c->off == len) {
    s->st.frames_sent++;
    frame_unref(s, c->cur);
    c->cur = NULL;
  }
  if (c->cur != NULL || c->queued != NULL || (c->need_snapshot && !s->pass_active))
    ws_want_write(c);
  return 0;
}

static void ws_forget(conn *c) {
  keel_serve *s = c->s;
  frame_unref(s, c->cur);
  frame_unref(s, c->queued);
  c->cur = c->queued = NULL;
}

/* ---- HTTP (keel's own, on libuv) ------------------------------------- */

/* keel reads every request head itself, so that whatever libwebsockets
 * would refuse in its own way (its 403 for a request line it cannot
 * sanitise, a silent close for a head over its buffer) gets a 400: plain
 * requests are answered here, and only a valid WebSocket handshake on /ws
 * is handed to lws (lws_adopt_socket_vhost_readbuf() with the head
 * already read). */

enum { H_READ, H_WRITE, H_LINGER, H_CLOSING };

#define KEEL__SWEEP_MS 250

struct hconn {
  uv_tcp_t tcp;
  keel_serve *s;
  int state;
  bool keep;               /* keep the connection after this answer */
  char *in;                /* max_request_bytes: the head being read (and any
                              pipelined bytes after it) */
  size_t in_len;           /* bytes in `in` */
  size_t head_len;         /* of the request being answered */
  keel__http_scanner scan; /* of the head being read */
  uint64_t deadline;       /* uv_now(): closed when reached */
  uv_write_t wr;
  uv_shutdown_t sh;
  char hdr[512];
  char *body; /* the answer's body (a render buffer) */
  size_t body_len, body_cap;
  hconn *next, *prev;
};

/* Constant-time comparison of the given token with the server's. */
static bool token_eq(const keel_serve *s, const char *given, size_t a) {
  size_t b = strlen(s->token);
  unsigned diff = (unsigned)(a != b);
  for (size_t i = 0; i < a && i < b; i++) diff |= (unsigned)(given[i] ^ s->token[i]);
  return diff == 0;
}

static bool token_ok(const keel_serve *s, const keel__http_req *r) {
  if (s->token == NULL) return true;
  if (r->auth != NULL && r->auth_len > 7 && strncasecmp(r->auth, "Bearer ", 7) == 0) {
    const char *t = r->auth + 7;
    size_t n = r->auth_len - 7;
    while (n > 0 && *t == ' ') t++, n--;
    return token_eq(s, t, n);
  }
  /* ?token=<token> (percent-decoded) */
  char buf[512];
  size_t n;
  return keel__http_query_arg(r, "token", buf, sizeof buf, &n) && token_eq(s, buf, n);
}

static void h_closed(uv_handle_t *h) {
  hconn *c = h->data;
  keel_serve *s = c->s;
  keel__free(c->in);
  if (c->body) give_buf(s, c->body, c->body_cap);
  keel__free(c);
}

static void h_close(hconn *c) {
  if (c->state == H_CLOSING) return;
  keel_serve *s = c->s;
  c->state = H_CLOSING;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->http = c->next;
  if (c->next) c->next->prev = c->prev;
  if (s->st.clients > 0) s->st.clients--;
  if (s->http == NULL && !s->accept_paused) uv_timer_stop(&s->sweep);
  uv_close((uv_handle_t *)&c->tcp, h_closed);
}

static void h_process(hconn *c);
static void h_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

static void h_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  hconn *c = h->data;
  size_t cap = c->s->opts.max_request_bytes;
  if (c->state == H_LINGER) { /* read and dropped */
    buf->base = c->in;
    buf->len = cap;
    return;
  }
  buf->base = c->in + c->in_len;
  buf->len = cap - c->in_len;
}

static void h_shut(uv_shutdown_t *req, int status) {
  hconn *c = req->data;
  if (status < 0) h_close(c); /* nothing if closing already */
}

static void h_written(uv_write_t *req, int status) {
  hconn *c = req->data;
  keel_serve *s = c->s;
  if (c->state == H_CLOSING) return; /* the close callback frees the body */
  if (status < 0) {
    h_close(c);
    return;
  }
  s->st.bytes_sent += c->body_len;
  give_buf(s, c->body, c->body_cap);
  c->body = NULL;
  c->body_len = c->body_cap = 0;
  c->deadline = uv_now(s->loop) + (uint64_t)s->opts.request_timeout_s * 1000u;
  if (!c->keep) {
    /* FIN after the answer, then read and drop what the client still
     * sends until it closes (or the deadline): closing with unread bytes
     * would send a reset, and the client could lose the answer. */
    c->state = H_LINGER;
    c->sh.data = c;
    if (uv_shutdown(&c->sh, (uv_stream_t *)&c->tcp, h_shut) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, h_alloc, h_read) != 0)
      h_close(c);
    return;
  }
  c->state = H_READ;
  memmove(c->in, c->in + c->head_len, c->in_len - c->head_len); /* pipelined */
  c->in_len -= c->head_len;
  c->head_len = 0;
  memset(&c->scan, 0, sizeof c->scan);
  if (uv_read_start((uv_stream_t *)&c->tcp, h_alloc, h_read) != 0) {
    h_close(c);
    return;
  }
  if (c->in_len > 0) h_process(c);
}

static const char *reason_of(unsigned status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    default:
      return "Service Unavailable";
  }
}

/* Writes status, headers and body (a render buffer, taken over; body_off
 * bytes of room in front are skipped). `extra` is whole header lines. */
static void h_respond(hconn *c, unsigned status, const char *ctype, keel__buf *b, size_t body_off,
                      const char *extra) {
  keel_serve *s = c->s;
  size_t len = b->len - body_off;
  int n = snprintf(c->hdr, sizeof c->hdr,
                   "HTTP/1.1 %u %s\r\ncontent-type: %s\r\ncontent-length: %zu\r\n"
                   "cache-control: no-store\r\nx-content-type-options: nosniff\r\n%s%s\r\n",
                   status, reason_of(status), ctype, len, extra ? extra : "",
                   c->keep ? "" : "connection: close\r\n");
  s->st.requests++;
  if (status >= 400 && status < 500) s->st.responses_4xx++;
  c->body = b->data;
  c->body_cap = b->cap;
  c->body_len = len;
  if (n <= 0 || (size_t)n >= sizeof c->hdr) {
    h_close(c);
    return;
  }
  uv_read_stop((uv_stream_t *)&c->tcp);
  c->state = H_WRITE;
  c->deadline = uv_now(s->loop) + (uint64_t)s->opts.request_timeout_s * 1000u;
  uv_buf_t bufs[2] = {uv_buf_init(c->hdr, (unsigned)n),
                      uv_buf_init(b->data ? b->data + body_off : c->hdr, (unsigned)len)};
  c->wr.data = c;
  if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, bufs, len > 0 ? 2 : 1, h_written) != 0) h_close(c);
}

static void h_text(hconn *c, unsigned status, const char *text, const char *extra) {
  keel__buf b = take_buf(c->s);
  keel__buf_puts(&b, text);
  keel__buf_put(&b, "\n", 1);
  if (b.failed) {
    keel__buf_free(&b);
    h_close(c);
    return;
  }
  h_respond(c, status, "text/plain; charset=utf-8", &b, 0, extra);
}

static void h_bad(hconn *c, const char *why) {
  c->keep = false;
  h_text(c, 400, why, NULL);
}

/* A WebSocket handshake on /ws: lws takes the socket over with the bytes
 * read so far. */
static void h_upgrade(hconn *c) {
  keel_serve *s = c->s;
  int fd = -1;
  uv_os_fd_t ofd;
  if (uv_fileno((uv_handle_t *)&c->tcp, &ofd) == 0) fd = fcntl(ofd, F_DUPFD_CLOEXEC, 0);
  struct lws_vhost *vh = lws_get_vhost_by_name(s->ctx, "default");
  if (fd < 0 || vh == NULL) {
    if (fd >= 0) close(fd);
    c->keep = false;
    h_text(c, 503, "cannot take the WebSocket", NULL);
    return;
  }
  h_close(c); /* its fd closes now; the socket lives on in fd */
  /* lws owns fd from here, and closes it on failure */
  (void)lws_adopt_socket_vhost_readbuf(vh, fd, c->in, c->in_len);
}

/* Answers the complete head in[0..head_len). */
static void h_answer(hconn *c) {
  keel_serve *s = c->s;
  keel__http_req r;
  if (!keel__http_parse_head(c->in, c->head_len, &r)) {
    h_bad(c, "malformed request");
    return;
  }
  if (r.hosts > 1 || (r.minor == 1 && r.hosts == 0)) {
    h_bad(c, "one Host header required");
    return;
  }
  c->keep = r.minor == 1 && !r.conn_close && !r.has_body && !r.upgrade_ws;
  bool get = keel__http_ieq(r.method, r.method_len, "GET");
  bool ws_path = r.path_len == 3 && memcmp(r.path, "/ws", 3) == 0;
  if (!get) {
    h_text(c, 405, "method not allowed", "allow: GET\r\n");
    return;
  }
  if (r.upgrade_ws) {
    if (!ws_path) {
      h_text(c, 404, "not found", NULL);
      return;
    }
    if (!token_ok(s, &r)) {
      s->st.unauthorized++;
      h_text(c, 401, "unauthorized", "www-authenticate: Bearer realm=\"keel\"\r\n");
      return;
    }
    if (!r.conn_upgrade || !r.ws_key || !r.ws_version_13 || r.has_body || r.minor != 1) {
      h_bad(c, "bad WebSocket handshake");
      return;
    }
    h_upgrade(c);
    return;
  }
  if (!token_ok(s, &r)) {
    s->st.unauthorized++;
    h_text(c, 401, "unauthorized", "www-authenticate: Bearer realm=\"keel\"\r\n");
    return;
  }
#define PATH_IS(lit) (r.path_len == sizeof lit - 1 && memcmp(r.path, lit, sizeof lit - 1) == 0)
  keel__buf b = take_buf(s);
  if (PATH_IS("/metrics")) {
    if (render_metrics(s, &b) != 0) goto oom;
    h_respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", &b, 0, NULL);
    return;
  }
  if (PATH_IS("/stats.json")) {
    if (render_json(s, &b) != 0) goto oom;
    h_respond(c, 200, "application/json", &b, 0, NULL);
    return;
  }
  if (PATH_IS("/") || PATH_IS("/index.html")) {
    keel__buf_put(&b, keel__serve_page, keel__serve_page_len);
    if (b.failed) goto oom;
    h_respond(c, 200, "text/html; charset=utf-8", &b, 0,
              "content-security-policy: default-src 'none'; script-src 'unsafe-inline'; "
              "style-src 'unsafe-inline'; connect-src 'self'; img-src data:\r\n");
    return;
  }
#undef PATH_IS
  give_buf(s, b.data, b.cap);
  if (ws_path) {
    h_text(c, 400, "WebSocket upgrade required", NULL);
    return;
  }
  h_text(c, 404, "not found", NULL);
  return;
oom:
  keel__buf_free(&b);
  keel__buf_free(&s->spare);
  c->keep = false;
  h_text(c, 503, "out of memory", NULL);
}

/* Looks for the end of the head in what was read. */
static void h_process(hconn *c) {
  size_t skip = c->scan.line_pos == 0 ? keel__http_leading_empty_lines(c->in, c->in_len) : 0;
  if (skip > 0) {
    memmove(c->in, c->in + skip, c->in_len - skip);
    c->in_len -= skip;
  }
  switch (keel__http_scan(&c->scan, c->in, c->in_len, &c->head_len)) {
    case KEEL__HTTP_HEAD:
      h_answer(c);
      return;
    case KEEL__HTTP_BAD:
      h_bad(c, "malformed request");
      return;
    default:
      if (c->in_len >= c->s->opts.max_request_bytes) h_bad(c, "request too large");
  }
}

static void h_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  hconn *c = st->data;
  if (nread < 0) {
    h_close(c);
    return;
  }
  if (nread == 0 || c->state != H_READ) return; /* H_LINGER: dropped */
  c->in_len += (size_t)nread;
  h_process(c);
}

static void on_listen(uv_poll_t *p, int status, int events);

static void on_sweep(uv_timer_t *t) {
  keel_serve *s = t->data;
  uint64_t now = uv_now(s->loop);
  if (s->accept_paused && !s->closing) {
    s->accept_paused = false;
    uv_poll_start(&s->lpoll, UV_READABLE, on_listen);
    if (s->http == NULL) uv_timer_stop(&s->sweep);
  }
  hconn *next;
  for (hconn *c = s->http; c; c = next) {
    next = c->next;
    if (c->deadline <= now) h_close(c);
  }
}

static void accept_one(keel_serve *s, int fd) {
  if (s->st.clients >= s->opts.max_clients) {
    s->st.refused++;
    close(fd);
    return;
  }
  hconn *c = keel__calloc(1, sizeof *c);
  char *in = c ? keel__malloc(s->opts.max_request_bytes) : NULL;
  if (c == NULL || in == NULL || uv_tcp_init(s->loop, &c->tcp) != 0) {
    keel__free(in);
    keel__free(c);
    close(fd);
    return;
  }
  c->s = s;
  c->in = in;
  c->tcp.data = c;
  c->state = H_READ;
  c->deadline = uv_now(s->loop) + (uint64_t)s->opts.request_timeout_s * 1000u;
  c->next = s->http;
  if (s->http) s->http->prev = c;
  s->http = c;
  s->st.clients++;
  if (!uv_is_active((uv_handle_t *)&s->sweep))
    uv_timer_start(&s->sweep, on_sweep, KEEL__SWEEP_MS, KEEL__SWEEP_MS);
  if (uv_tcp_open(&c->tcp, fd) != 0) {
    close(fd);
    h_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  if (uv_read_start((uv_stream_t *)&c->tcp, h_alloc, h_read) != 0) h_close(c);
}

static void on_listen(uv_poll_t *p, int status, int events) {
  (void)events;
  keel_serve *s = p->data;
  if (status < 0 || s->closing) return;
  for (int i = 0; i < 64; i++) { /* a bounded batch per wakeup */
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        /* the socket stays readable: wait for the next sweep, not spin */
        uv_poll_stop(&s->lpoll);
        s->accept_paused = true;
        if (!uv_is_active((uv_handle_t *)&s->sweep))
          uv_timer_start(&s->sweep, on_sweep, KEEL__SWEEP_MS, KEEL__SWEEP_MS);
      }
      return; /* EAGAIN, ECONNABORTED...: the next wakeup */
    }
    accept_one(s, fd);
  }
}

/* ---- the lws protocol callback -------------------------------------- */

static int on_lws(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                  size_t len) {
  struct lws_context *ctx = lws_get_context(wsi);
  keel_serve *s = ctx ? lws_context_user(ctx) : NULL;
  conn *c = user;
  switch (reason) {
    case LWS_CALLBACK_WSI_CREATE:
      if (s) s->st.clients++;
      return 0;
    case LWS_CALLBACK_WSI_DESTROY:
      if (s && s->st.clients > 0) s->st.clients--;
      return 0;
    case LWS_CALLBACK_HTTP_BIND_PROTOCOL:
      if (c) {
        memset(c, 0, sizeof *c);
        c->s = s;
        c->wsi = wsi;
      }
      return 0;
    case LWS_CALLBACK_HTTP:
    case LWS_CALLBACK_HTTP_WRITEABLE:
      return -1; /* keel answers HTTP itself; lws only gets WebSocket handshakes */
    case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
      /* keel checked the path, the token and the handshake already */
      return s == NULL || s->closing ? 1 : 0;
    case LWS_CALLBACK_ESTABLISHED:
      if (c == NULL || s == NULL) return -1;
      memset(c, 0, sizeof *c);
      c->s = s;
      c->wsi = wsi;
      c->is_ws = true;
      c->next = s->ws;
      if (s->ws) s->ws->prev = c;
      s->ws = c;
      s->st.ws_clients++;
      s->st.ws_accepted++;
      c->need_snapshot = true;
      ws_start_ticking(s);
      if (!s->pass_active) ws_want_write(c); /* else when the pass ends */
      return 0;
    case LWS_CALLBACK_SERVER_WRITEABLE:
      if (c == NULL || !c->is_ws) return 0;
      return ws_write(c);
    case LWS_CALLBACK_RECEIVE:
      return 0; /* clients have nothing to say; lws bounds the buffer */
    case LWS_CALLBACK_CLOSED:
      if (c == NULL || !c->is_ws || s == NULL) return 0;
      if (c->prev)
        c->prev->next = c->next;
      else
        s->ws = c->next;
      if (c->next) c->next->prev = c->prev;
      c->is_ws = false;
      ws_forget(c);
      s->st.ws_clients--;
      if (s->ws == NULL && s->ticking) {
        s->ticking = false;
        uv_timer_stop(&s->tick);
        pass_stop(s);
      }
      return 0;
    default:
      break;
  }
  return lws_callback_http_dummy(wsi, reason, user, in, len);
}

static const struct lws_protocols protocols[] = {
    {"keel", on_lws, sizeof(conn), 4096, 0, NULL, 0},
    {NULL, NULL, 0, 0, 0, NULL, 0},
};

/* ---- life cycle ------------------------------------------------------ */

static void serve_free(keel_serve *s) {
  s->closing = true; /* frames are freed, not pooled */
  frame_unref(s, s->delta);
  frame_unref(s, s->snapshot);
  while (s->free_frames) {
    frame *f = s->free_frames;
    s->free_frames = f->next_free;
    keel__buf_free(&f->b);
    keel__free(f);
  }
  keel__buf_free(&s->scratch);
  keel__buf_free(&s->spare);
  keel__writer_dispose(&s->prom);
  keel__free(s->removed);
  keel__free(s->host);
  keel__free(s->token);
  if (s->listen_fd >= 0) close(s->listen_fd);
  keel__free(s);
}

/* lws's log level is process-wide (see serve.h): set once, under uv_once
 * since servers may start on several threads. */
static uv_once_t lws_log_once = UV_ONCE_INIT;

static void quiet_lws_log(void) {
  lws_set_log_level(0, NULL);
}

/* The listening socket (keel accepts; lws listens on nothing). Returns
 * the fd or a UV_E* code. */
static int listen_socket(const char *host, int port, int *port_out) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) return UV_EINVAL;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return uv_translate_sys_error(errno);
  int one = 1;
  socklen_t alen = sizeof a;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, SOMAXCONN) != 0 ||
      getsockname(fd, (struct sockaddr *)&a, &alen) != 0) {
    int rc = uv_translate_sys_error(errno);
    close(fd);
    return rc;
  }
  *port_out = ntohs(a.sin_port);
  return fd;
}

static void free_on_close(uv_handle_t *h) {
  serve_free(h->data);
}

int keel_serve_new(uv_loop_t *loop, const keel_serve_opts *opts, keel_serve **out) {
  keel_serve_opts defaults;
  if (opts == NULL) {
    keel_serve_opts_init(&defaults);
    opts = &defaults;
  }
  if (loop == NULL || out == NULL || opts->host == NULL || opts->port < 0 || opts->port > 65535 ||
      opts->max_clients == 0 || opts->max_request_bytes < 256 || opts->max_request_bytes > 65535 ||
      opts->ws_interval_ms < 10 || opts->ws_max_frame_bytes == 0 || opts->request_timeout_s == 0 ||
      (opts->token != NULL && (opts->token[0] == '\0' || strlen(opts->token) > 256)))
    return UV_EINVAL;
  struct in_addr probe;
  if (inet_pton(AF_INET, opts->host, &probe) != 1) return UV_EINVAL;
  keel_serve *s = keel__calloc(1, sizeof *s);
  if (s == NULL) return UV_ENOMEM;
  s->listen_fd = -1;
  s->loop = loop;
  s->opts = *opts;
  s->host = keel__strdup(opts->host);
  s->token = opts->token ? keel__strdup(opts->token) : NULL;
  if (s->host == NULL || (opts->token && s->token == NULL)) {
    serve_free(s);
    return UV_ENOMEM;
  }
  s->opts.host = s->host;
  s->opts.token = s->token;
  int fd = listen_socket(s->host, opts->port, &s->port);
  if (fd < 0) {
    serve_free(s);
    return fd;
  }
  s->listen_fd = fd;
  int rc = uv_poll_init_socket(loop, &s->lpoll, fd);
  if (rc != 0) {
    serve_free(s);
    return rc;
  }
  s->lpoll.data = s;

  uv_once(&lws_log_once, quiet_lws_log);
  struct lws_context_creation_info info;
  memset(&info, 0, sizeof info);
  void *foreign[1] = {loop};
  info.foreign_loops = foreign;
  info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_DISABLE_IPV6;
  info.port = CONTEXT_PORT_NO_LISTEN_SERVER; /* keel accepts and hands WebSockets over */
  info.protocols = protocols;
  info.user = s;
  info.pcontext = &s->ctx;
  /* lws parses only WebSocket handshakes keel has checked (at most
   * max_request_bytes): one header buffer per WebSocket being set up. */
  info.max_http_header_data =
      (unsigned short)(opts->max_request_bytes < 65535 - 64 ? opts->max_request_bytes + 64 : 65535);
  info.max_http_header_pool = (unsigned short)(opts->max_clients < 256 ? opts->max_clients : 256);
  info.timeout_secs = opts->request_timeout_s;
  info.ka_time = 0;
  s->ctx = lws_create_context(&info);
  if (s->ctx == NULL) {
    uv_close((uv_handle_t *)&s->lpoll, free_on_close); /* frees s, closes the fd */
    return UV_ENOMEM;
  }
  uv_poll_start(&s->lpoll, UV_READABLE, on_listen);
  uv_timer_init(loop, &s->tick);
  uv_timer_init(loop, &s->sweep);
  uv_idle_init(loop, &s->slice);
  uv_idle_init(loop, &s->destroy_idle);
  uv_prepare_init(loop, &s->iter);
  uv_prepare_start(&s->iter, on_iter);
  uv_unref((uv_handle_t *)&s->iter);
  s->iter.data = s;
  s->slice.data = s;
  s->tick.data = s;
  s->sweep.data = s;
  s->destroy_idle.data = s;
  *out = s;
  return 0;
}

static void on_handle_closed(uv_handle_t *h) {
  keel_serve *s = h->data;
  if (--s->handles > 0) return;
  keel_close_cb cb = s->close_cb;
  void *data = s->close_data;
  serve_free(s);
  if (cb) cb(s, data);
}

static void find_closing(uv_handle_t *h, void *arg) {
  if (uv_is_closing(h)) *(bool *)arg = true;
}

static void on_destroy_idle(uv_idle_t *idle) {
  keel_serve *s = idle->data;
  bool closing = false;
  uv_walk(s->loop, find_closing, &closing);
  s->quiet_iterations = closing ? 0 : s->quiet_iterations + 1;
  if (s->quiet_iterations < 2) return;
  if (s->ctx != NULL) lws_context_destroy(s->ctx); /* frees it; pcontext -> NULL */
  s->ctx = NULL;
  uv_idle_stop(idle);
  s->handles = 6;
  uv_close((uv_handle_t *)&s->lpoll, on_handle_closed);
  uv_close((uv_handle_t *)&s->sweep, on_handle_closed);
  uv_close((uv_handle_t *)&s->tick, on_handle_closed);
  uv_close((uv_handle_t *)&s->iter, on_handle_closed);
  uv_close((uv_handle_t *)&s->slice, on_handle_closed);
  uv_close((uv_handle_t *)&s->destroy_idle, on_handle_closed);
}

void keel_serve_close(keel_serve *s, keel_close_cb cb, void *data) {
  if (s == NULL || s->closing) return;
  s->closing = true;
  s->close_cb = cb;
  s->close_data = data;
  while (s->regs) {
    keel_stats_reg *r = s->regs;
    keel__stats_hook_unlink(&r->hook);
    s->regs = r->next;
    reg_free(r);
  }
  s->regs_tail = NULL;
  s->st.registered = 0;
  uv_timer_stop(&s->tick);
  s->ticking = false;
  pass_stop(s);
  uv_poll_stop(&s->lpoll);
  close(s->listen_fd); /* stopped: no longer watched */
  s->listen_fd = -1;
  while (s->http) h_close(s->http);
  uv_timer_stop(&s->sweep);
  lws_context_destroy(s->ctx); /* closes every connection; ws list empties */
  s->quiet_iterations = 0;
  uv_idle_start(&s->destroy_idle, on_destroy_idle);
}
