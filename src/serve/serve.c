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
#include <libwebsockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/util.h"
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
  bool close_after; /* HTTP: close once the answer is out (a 400) */
  /* HTTP: the body being sent, LWS_PRE bytes of room in front */
  char *body;
  size_t body_len, body_off, body_cap;
  /* WebSocket: the frame being written (from off), the one queued behind
   * it; a client that falls two frames behind gets a snapshot instead. */
  frame *cur, *queued;
  size_t off;
  bool need_snapshot; /* the next frame is a full snapshot */
  bool behind;        /* deltas are being dropped until that snapshot */
  conn *next, *prev;
};

struct keel_serve {
  uv_loop_t *loop;
  struct lws_context *ctx;
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
  if (hooks == NULL) return UV_EINVAL;
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

bool keel__tcp_sent_data(int fd);
uint64_t keel__tcp_received(int fd);

/* The size of the request head being answered: the bytes the kernel
 * received on the connection since the last answer (kept as the wsi's
 * opaque user data). lws's own buffer is 64 KiB, so this is how
 * max_request_bytes becomes a 400 instead of a silent close. 0 when
 * unknown. */
static uint64_t request_bytes(struct lws *wsi) {
  lws_sockfd_type fd = lws_get_socket_fd(wsi);
  if (fd < 0) return 0;
  uint64_t rx = keel__tcp_received(fd), base = (uint64_t)(uintptr_t)lws_get_opaque_user_data(wsi);
  return rx > base ? rx - base : 0;
}

static void request_done(struct lws *wsi) {
  lws_sockfd_type fd = lws_get_socket_fd(wsi);
  if (fd >= 0) lws_set_opaque_user_data(wsi, (void *)(uintptr_t)keel__tcp_received(fd));
}

/* ---- HTTP ------------------------------------------------------------ */

static bool token_ok(keel_serve *s, struct lws *wsi) {
  if (s->token == NULL) return true;
  char buf[512];
  const char *given = NULL;
  int n = lws_hdr_copy(wsi, buf, (int)sizeof buf, WSI_TOKEN_HTTP_AUTHORIZATION);
  if (n > 7 && strncasecmp(buf, "Bearer ", 7) == 0)
    given = buf + 7;
  else
    given = lws_get_urlarg_by_name(wsi, "token=", buf, (int)sizeof buf);
  if (given == NULL) return false;
  size_t a = strlen(given), b = strlen(s->token);
  unsigned diff = (unsigned)(a != b);
  for (size_t i = 0; i < a && i < b; i++) diff |= (unsigned)(given[i] ^ s->token[i]);
  return diff == 0;
}

static void drop_body(conn *c) {
  if (c->body == NULL) return;
  give_buf(c->s, c->body, c->body_cap);
  c->body = NULL;
}

/* Sends status + headers, then the body (taken over; LWS_PRE room in
 * front) over the following WRITEABLE callbacks. */
static int respond(conn *c, unsigned status, const char *ctype, keel__buf *b,
                   const char *extra_name, const char *extra_value) {
  keel_serve *s = c->s;
  size_t len = b->len - LWS_PRE;
  unsigned char hdr[LWS_PRE + 1024], *start = hdr + LWS_PRE, *p = start,
                                     *end = hdr + sizeof hdr - 1;
  s->st.requests++;
  if (status >= 400 && status < 500) s->st.responses_4xx++;
  if (lws_add_http_common_headers(c->wsi, status, ctype, (lws_filepos_t)len, &p, end) ||
      lws_add_http_header_by_name(c->wsi, (const unsigned char *)"cache-control:",
                                  (const unsigned char *)"no-store", 8, &p, end) ||
      lws_add_http_header_by_name(c->wsi, (const unsigned char *)"x-content-type-options:",
                                  (const unsigned char *)"nosniff", 7, &p, end) ||
      (extra_name != NULL && lws_add_http_header_by_name(c->wsi, (const unsigned char *)extra_name,
                                                         (const unsigned char *)extra_value,
                                                         (int)strlen(extra_value), &p, end)) ||
      lws_finalize_write_http_header(c->wsi, start, &p, end)) {
    give_buf(s, b->data, b->cap);
    return -1;
  }
  drop_body(c);
  c->body = b->data;
  c->body_cap = b->cap;
  c->body_len = len;
  c->body_off = 0;
  lws_callback_on_writable(c->wsi);
  return 0;
}

static int respond_text(conn *c, unsigned status, const char *text, const char *extra_name,
                        const char *extra_value) {
  keel__buf b = take_buf(c->s);
  keel__buf_put(&b, lws_room, LWS_PRE);
  keel__buf_puts(&b, text);
  keel__buf_put(&b, "\n", 1);
  if (b.failed) {
    keel__buf_free(&b);
    return -1;
  }
  return respond(c, status, "text/plain; charset=utf-8", &b, extra_name, extra_value);
}

static int http_writeable(conn *c) {
  if (c->body == NULL) return 0;
  size_t left = c->body_len - c->body_off;
  /* All but the last byte go straight to the socket, as much as it takes
   * (no copy, no 64 KiB steps); lws writes the last one and ends the
   * answer. Only once lws has nothing of its own left to send (headers). */
  lws_sockfd_type fd = lws_get_socket_fd(c->wsi);
  if (left > 1 && fd >= 0 && !lws_partial_buffered(c->wsi)) {
    ssize_t m = send(fd, c->body + LWS_PRE + c->body_off, left - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (m < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
    if (m > 0) {
      c->body_off += (size_t)m;
      c->s->st.bytes_sent += (uint64_t)m;
      left -= (size_t)m;
    }
    if (left > 1) {
      lws_callback_on_writable(c->wsi);
      return 0;
    }
  }
  size_t n = chunk_size(left);
  bool final = n == left;
  /* The LWS_PRE bytes before this chunk are room (first chunk) or bytes
   * already sent: lws may write there. */
  unsigned char *p = (unsigned char *)c->body + LWS_PRE + c->body_off;
  if (lws_write(c->wsi, p, n, final ? LWS_WRITE_HTTP_FINAL : LWS_WRITE_HTTP) != (int)n) return -1;
  c->s->st.bytes_sent += n;
  c->body_off += n;
  if (!final) {
    lws_callback_on_writable(c->wsi);
    return 0;
  }
  drop_body(c);
  if (c->close_after) return -1;
  request_done(c->wsi);
  if (lws_http_transaction_completed(c->wsi)) return -1;
  return 0;
}

static int http_request(conn *c, const char *path) {
  keel_serve *s = c->s;
  struct lws *wsi = c->wsi;
  if (request_bytes(wsi) > s->opts.max_request_bytes) {
    c->close_after = true;
    return respond_text(c, 400, "request too large", "connection:", "close");
  }
  if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
    return respond_text(c, 405, "method not allowed", "allow:", "GET");
  if (!token_ok(s, wsi)) {
    s->st.unauthorized++;
    return respond_text(c, 401, "unauthorized", "www-authenticate:", "Bearer realm=\"keel\"");
  }
  keel__buf b = take_buf(s);
  keel__buf_put(&b, lws_room, LWS_PRE);
  if (strcmp(path, "/metrics") == 0) {
    if (render_metrics(s, &b) != 0) goto oom;
    return respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", &b, NULL, NULL);
  }
  if (strcmp(path, "/stats.json") == 0) {
    if (render_json(s, &b) != 0) goto oom;
    return respond(c, 200, "application/json", &b, NULL, NULL);
  }
  if (strcmp(path, "/") == 0 || strcmp(path, "/index.html") == 0) {
    keel__buf_put(&b, keel__serve_page, keel__serve_page_len);
    if (b.failed) goto oom;
    return respond(c, 200, "text/html; charset=utf-8", &b, "content-security-policy:",
                   "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                   "connect-src 'self'; img-src data:");
  }
  give_buf(s, b.data, b.cap);
  if (strcmp(path, "/ws") == 0)
    return respond_text(c, 400, "WebSocket upgrade required", NULL, NULL);
  return respond_text(c, 404, "not found", NULL, NULL);
oom:
  keel__buf_free(&b);
  keel__buf_free(&s->spare);
  return respond_text(c, 503, "out of memory", NULL, NULL);
}

/* ---- answers libwebsockets does not give ----------------------------- */

/* libwebsockets 4.1 refuses a WebSocket handshake by closing. When nothing
 * at all was sent on the connection yet (so no response can be under
 * way), keel writes a short answer itself before lws closes the socket:
 * what the client sent and was not read is dropped first, then the
 * answer, then FIN. */
static void raw_answer(keel_serve *s, struct lws *wsi, unsigned status, const char *reason,
                       const char *extra) {
  lws_sockfd_type fd = lws_get_socket_fd(wsi);
  if (fd < 0 || keel__tcp_sent_data(fd)) return;
  char junk[4096];
  for (int i = 0; i < 64 && recv(fd, junk, sizeof junk, MSG_DONTWAIT) > 0; i++) {
  }
  char msg[512];
  int n = snprintf(msg, sizeof msg,
                   "HTTP/1.1 %u %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   "content-length: %zu\r\ncache-control: no-store\r\n%sconnection: close\r\n\r\n"
                   "%s\n",
                   status, reason, strlen(reason) + 1, extra ? extra : "", reason);
  if (n <= 0 || (size_t)n >= sizeof msg) return;
  ssize_t m = send(fd, msg, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
  shutdown(fd, SHUT_WR);
  if (m <= 0) return; /* the client is gone */
  s->st.requests++;
  s->st.responses_4xx++;
  s->st.bytes_sent += (uint64_t)m;
}

/* ---- the lws protocol callback -------------------------------------- */

/* Headers and body go out in separate writes: without TCP_NODELAY, Nagle
 * holds the body until the client's delayed ACK of the headers (40 ms). */
static void no_delay(struct lws *wsi) {
  int one = 1;
  lws_sockfd_type fd = lws_get_socket_fd(wsi);
  if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int on_lws(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                  size_t len) {
  struct lws_context *ctx = lws_get_context(wsi);
  keel_serve *s = ctx ? lws_context_user(ctx) : NULL;
  conn *c = user;
  switch (reason) {
    case LWS_CALLBACK_FILTER_NETWORK_CONNECTION:
      if (s == NULL || s->closing) return 1;
      if (s->st.clients >= s->opts.max_clients) {
        s->st.refused++;
        return 1;
      }
      return 0;
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
      if (c == NULL || s == NULL) return -1;
      c->s = s;
      c->wsi = wsi;
      no_delay(wsi);
      return http_request(c, in ? (const char *)in : "/");
    case LWS_CALLBACK_HTTP_BODY:
      return 0;
    case LWS_CALLBACK_HTTP_WRITEABLE:
      if (c == NULL) return -1;
      return http_writeable(c);
    case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
      if (c && !c->is_ws && c->s != NULL) drop_body(c);
      return 0;
    case LWS_CALLBACK_CLOSED_HTTP:
      if (c && !c->is_ws && c->s != NULL) drop_body(c);
      return 0;
    case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION: {
      char uri[64];
      if (s == NULL || s->closing) return 1;
      if (lws_hdr_copy(wsi, uri, (int)sizeof uri, WSI_TOKEN_GET_URI) <= 0 ||
          strcmp(uri, "/ws") != 0) {
        raw_answer(s, wsi, 404, "Not Found", NULL);
        return 1;
      }
      if (!token_ok(s, wsi)) {
        s->st.unauthorized++;
        raw_answer(s, wsi, 401, "Unauthorized", "www-authenticate: Bearer realm=\"keel\"\r\n");
        return 1;
      }
      return 0;
    }
    case LWS_CALLBACK_ESTABLISHED:
      if (c == NULL || s == NULL) return -1;
      memset(c, 0, sizeof *c);
      c->s = s;
      c->wsi = wsi;
      c->is_ws = true;
      no_delay(wsi);
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
  keel__free(s);
}

static int lws_log_set;

/* Binds host:port once and lets go: libwebsockets 4.1 fails context
 * creation on a taken port but leaves a close callback pending on the
 * foreign loop that touches freed memory, so keel refuses the port before
 * lws sees it. Returns 0 or a UV_E* code. */
static int probe_bind(const char *host, int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) return UV_EINVAL;
  if (port == 0) return 0;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return uv_translate_sys_error(errno);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int rc = bind(fd, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : uv_translate_sys_error(errno);
  close(fd);
  return rc;
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
  int rc = probe_bind(opts->host, opts->port);
  if (rc != 0) return rc;
  keel_serve *s = keel__calloc(1, sizeof *s);
  if (s == NULL) return UV_ENOMEM;
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

  if (!lws_log_set) {
    lws_log_set = 1;
    lws_set_log_level(0, NULL); /* process-wide: see serve.h */
  }
  struct lws_context_creation_info info;
  memset(&info, 0, sizeof info);
  void *foreign[1] = {loop};
  info.foreign_loops = foreign;
  info.options = LWS_SERVER_OPTION_LIBUV | LWS_SERVER_OPTION_DISABLE_IPV6;
  info.port = opts->port; /* 0: the kernel picks one */
  info.iface = s->host;
  info.protocols = protocols;
  info.user = s;
  info.pcontext = &s->ctx;
  /* lws's buffer for a request head: the most it takes (64 KiB), so that
   * heads over max_request_bytes reach http_request() and get a 400;
   * beyond 64 KiB lws closes without an answer. At most 256 buffers at
   * once (16 MiB); connections beyond wait for one. */
  info.max_http_header_data = 65535;
  info.max_http_header_pool = (unsigned short)(opts->max_clients < 256 ? opts->max_clients : 256);
  info.timeout_secs = opts->request_timeout_s;
  info.ka_time = 0;
  s->ctx = lws_create_context(&info);
  if (s->ctx == NULL) {
    serve_free(s);
    return UV_EADDRINUSE;
  }
  uv_timer_init(loop, &s->tick);
  uv_idle_init(loop, &s->slice);
  uv_idle_init(loop, &s->destroy_idle);
  uv_prepare_init(loop, &s->iter);
  uv_prepare_start(&s->iter, on_iter);
  uv_unref((uv_handle_t *)&s->iter);
  s->iter.data = s;
  s->slice.data = s;
  s->tick.data = s;
  s->destroy_idle.data = s;
  struct lws_vhost *vh = lws_get_vhost_by_name(s->ctx, "default");
  s->port = vh ? lws_get_vhost_listen_port(vh) : opts->port;
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
  s->handles = 4;
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
  lws_context_destroy(s->ctx); /* closes every connection; ws list empties */
  s->quiet_iterations = 0;
  uv_idle_start(&s->destroy_idle, on_destroy_idle);
}
