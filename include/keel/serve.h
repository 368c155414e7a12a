/*
 * keel/serve.h — observability over HTTP and WebSocket on your loop.
 *
 * A small server on the caller's uv_loop_t (keel's own HTTP/1.1 on libuv;
 * libwebsockets 4.1 on the same loop for the WebSocket: no thread of its
 * own, no polling) that shows the objects you
 * register: GET /metrics (Prometheus text format 0.0.4), GET /stats.json
 * (every object's stats as JSON), GET / (a self-contained live dashboard)
 * and /ws (a WebSocket that sends a full snapshot, then deltas every
 * ws_interval_ms).
 *
 *     keel_serve_opts o;
 *     keel_serve_opts_init(&o);              // 127.0.0.1, port 9464, no token
 *     o.port = 0;                            // pick a free port
 *     keel_serve *s;
 *     if (keel_serve_new(loop, &o, &s) != 0) abort();
 *     printf("http://127.0.0.1:%d/\n", keel_serve_port(s));
 *     keel_breaker_serve(s, breaker, "payments");   // one call per object
 *     keel_queue_serve(s, queue, "emails");
 *     ...
 *     keel_serve_close(s, NULL, NULL);       // before or after the objects
 *
 * What is shown comes through one small interface, keel_stats_source: a
 * kind ("breaker") and a write callback that reports the object's values
 * through a keel_stats_writer (counters, gauges, histograms, states, text).
 * The same callback feeds /metrics, /stats.json and the WebSocket. Every
 * keel module has an adapter (keel_breaker_serve(), keel_queue_serve(), ...
 * declared in the module's header); your own objects use
 * keel_serve_register().
 *
 * Order of closing. An object registered through its module's
 * keel_<module>_serve() is dropped from every server when its close begins;
 * a server closed first forgets its registrations. Either order is safe.
 * Objects registered with keel_serve_register() must be unregistered (or
 * the server closed) before they are freed.
 *
 * Everything is loop-thread only.
 */
#ifndef KEEL_SERVE_H
#define KEEL_SERVE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_serve keel_serve;
typedef struct keel_stats_writer keel_stats_writer;
typedef struct keel_stats_reg keel_stats_reg;

/* ---------------------------------------------------------------------- */
/* The interface a module implements                                       */
/* ---------------------------------------------------------------------- */

/*
 * What a kind of object shows. kind is 1 to 32 characters of [a-z0-9_],
 * starting with a letter; metric families are named keel_<kind>_<metric>.
 * write reports one object's current values through the keel_stats_*
 * functions below; it must report the same metrics, in the same order,
 * every time, and must not call back into the server. A source is usually
 * a static const.
 */
typedef struct keel_stats_source {
  const char *kind;
  void (*write)(const void *obj, keel_stats_writer *w);
} keel_stats_source;

/*
 * The writer calls. metric is [a-z0-9_]+ and carries its base unit
 * ("wait_seconds", "bytes"); help is one line of text (escaped on output).
 * Both are read during the call only (they may live in a buffer reused for
 * the next call); a family's HELP is the text of its first call.
 * In /metrics each call is one sample of family keel_<kind>_<metric> with
 * label name="<object name>"; in JSON it is one field of the object.
 * NULL-safe: a NULL writer or metric does nothing.
 */

/* A counter: only grows. /metrics: keel_<kind>_<metric>_total; JSON:
 * "<metric>": value. */
KEEL_EXTERN void keel_stats_counter(keel_stats_writer *w, const char *metric, const char *help,
                                    uint64_t value);
/* A gauge: /metrics keel_<kind>_<metric>; JSON "<metric>": value (null when
 * not finite). */
KEEL_EXTERN void keel_stats_gauge(keel_stats_writer *w, const char *metric, const char *help,
                                  double value);
/* A counter split by one label (e.g. a verifier's problems by code). Calls
 * for one metric must come one after another. /metrics: one sample with
 * {name="…",<label>="<label_value>"}; JSON: "<metric>": {"<label_value>":
 * value, …}. */
KEEL_EXTERN void keel_stats_counter_by(keel_stats_writer *w, const char *metric, const char *help,
                                       const char *label, const char *label_value, uint64_t value);
/* An enumerated state: names[0..n) are the possible states, current the
 * index of the present one. /metrics: gauge keel_<kind>_<metric> with one
 * sample per state, {state="<name>"} 1 for the current one and 0 for the
 * others; JSON: "<metric>": "<names[current]>". */
KEEL_EXTERN void keel_stats_state(keel_stats_writer *w, const char *metric, const char *help,
                                  const char *const *names, size_t n, size_t current);
/* A histogram of observations in base units (seconds, bytes). upper[i] is
 * bucket i's inclusive upper bound (ascending, finite); counts[i] the
 * observations in bucket i alone (not cumulative); observations above the
 * last bound are count - sum(counts). /metrics: _bucket{le=…} (cumulative,
 * with le="+Inf"), _sum, _count; JSON: {"count", "sum", "p50", "p99"} (the
 * quantiles are bucket upper bounds). */
KEEL_EXTERN void keel_stats_histogram(keel_stats_writer *w, const char *metric, const char *help,
                                      size_t nbuckets, const double *upper, const uint64_t *counts,
                                      double sum, uint64_t count);
/* Text shown in JSON and on the dashboard only ("<key>": "<value>"), not in
 * /metrics. value NULL writes null. */
KEEL_EXTERN void keel_stats_text(keel_stats_writer *w, const char *key, const char *value);

/* ---------------------------------------------------------------------- */
/* The server                                                              */
/* ---------------------------------------------------------------------- */

typedef struct keel_serve_opts {
  const char *host;           /* IPv4 address to bind; default "127.0.0.1" (copied) */
  int port;                   /* TCP port; 0 = pick a free one (keel_serve_port()); default 9464 */
  const char *token;          /* NULL (default) = no auth; else every request needs
                                 "Authorization: Bearer <token>" or "?token=<token>"
                                 (copied) */
  unsigned max_clients;       /* HTTP and WebSocket connections at once; one accepted
                                 beyond is closed at once without an answer
                                 (stats.refused); default 64 */
  size_t max_request_bytes;   /* request head: request line, header fields and the
                                 empty line; a longer head, like a malformed one,
                                 gets "400 Bad Request" and the connection closes
                                 (docs/serve.md, Security defaults); default 4096,
                                 256..65535 */
  unsigned ws_interval_ms;    /* WebSocket delta period; default 500, at least 10 */
  size_t ws_max_frame_bytes;  /* a delta or snapshot frame larger than this is not
                                 sent (counted in frames_dropped); default 4 MiB.
                                 Frames go out in fragments of up to 64 KiB */
  unsigned request_timeout_s; /* a request head must arrive complete within this of
                                 the accept or of the previous answer's end, and an
                                 answer be taken within this of its start; else the
                                 connection closes without an answer; default 5 */
  uint64_t reserved_[8];      /* ABI room: zero (opts_init does); never set */
} keel_serve_opts;

typedef struct keel_serve_stats {
  uint64_t requests;       /* counter: HTTP answers written (any status; not the
                              WebSocket 101) */
  uint64_t responses_4xx;  /* counter: 400, 401, 404, 405 answers */
  uint64_t unauthorized;   /* counter: 401 answers (requests and WebSocket
                              handshakes) */
  uint64_t refused;        /* counter: connections closed at accept over max_clients */
  uint64_t ws_accepted;    /* counter: WebSocket clients accepted */
  uint64_t frames_sent;    /* counter: WebSocket frames written */
  uint64_t frames_dropped; /* counter: deltas a slow client did not get (it gets a
                              fresh snapshot when it catches up) */
  uint64_t bytes_sent;     /* counter: body and frame bytes written */
  unsigned clients;        /* gauge: HTTP and WebSocket connections open now */
  unsigned ws_clients;     /* gauge: WebSocket clients now */
  unsigned registered;     /* gauge: objects registered */
  uint64_t reserved_[8];   /* ABI room: filled with zero */
} keel_serve_stats;

/* Fills opts with the defaults above (zeroes the whole struct first).
 * NULL-safe. */
KEEL_EXTERN void keel_serve_opts_init(keel_serve_opts *opts);

/*
 * Starts listening on loop. opts is copied (strings too); NULL means the
 * defaults. *out is set on success and untouched on failure.
 *
 * Returns 0; UV_EINVAL for a NULL loop/out, a host that is not an IPv4
 * address or an option out of range; UV_ENOMEM, also when libwebsockets
 * fails to start (e.g. its libuv plugin, package libwebsockets-evlib-uv,
 * is missing); UV_EADDRINUSE when the port is taken, UV_EADDRNOTAVAIL or
 * another UV_E* code of socket(), bind() or listen() when the address
 * cannot be bound. No callback runs inside this call. Loop thread only.
 */
KEEL_EXTERN int keel_serve_new(uv_loop_t *loop, const keel_serve_opts *opts, keel_serve **out);

/* The TCP port listened on (the picked one for port 0); -1 for NULL. Loop
 * thread only. */
KEEL_EXTERN int keel_serve_port(const keel_serve *s);

/*
 * Shows obj under name (1..128 bytes of UTF-8, copied; shown escaped).
 * Two objects may share a name only if their kinds differ. src must
 * outlive the registration; obj must stay valid until unregistered.
 * reg_out may be NULL.
 *
 * Returns 0; UV_EINVAL for a NULL argument, a bad kind or name;
 * KEEL_ECONFLICT when that kind and name are already registered;
 * UV_ENOMEM; KEEL_ECLOSING after keel_serve_close(). Nothing is registered
 * on failure. Loop thread only.
 */
KEEL_EXTERN int keel_serve_register(keel_serve *s, const keel_stats_source *src, const void *obj,
                                    const char *name, keel_stats_reg **reg_out);

/* Removes a registration made with keel_serve_register(). NULL-safe; a
 * registration the server already dropped (its close) must not be passed.
 * Loop thread only. */
KEEL_EXTERN void keel_serve_unregister(keel_stats_reg *reg);

/*
 * Writes the /metrics text (Prometheus 0.0.4) into a buffer allocated with
 * keel's allocator; *text_out gets it (NUL-terminated, free with
 * keel_free()), *len_out its length (may be NULL). Returns 0, UV_EINVAL or
 * UV_ENOMEM (outputs untouched). Loop thread only.
 */
KEEL_EXTERN int keel_serve_metrics_text(keel_serve *s, char **text_out, size_t *len_out);

/* Same for /stats.json. */
KEEL_EXTERN int keel_serve_stats_json(keel_serve *s, char **text_out, size_t *len_out);

/* Fills *out (NULL-safe). Loop thread only. */
KEEL_EXTERN void keel_serve_get_stats(const keel_serve *s, keel_serve_stats *out);

/*
 * Stops listening, closes every connection and forgets every registration
 * (the objects stay open). cb(s, data) runs on a later loop iteration once
 * libwebsockets has let go of every handle; after it uv_loop_close()
 * returns 0. NULL-safe; a second call does nothing. Loop thread only.
 */
KEEL_EXTERN void keel_serve_close(keel_serve *s, keel_close_cb cb, void *data);

#ifdef __cplusplus
}
#endif

#endif
