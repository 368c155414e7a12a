/* Private to src/serve: the HTTP/1.x request-head reader, with no I/O (the
 * server in serve.c feeds it the bytes it read; tests/fuzz/fuzz_http.c feeds
 * it anything). It never reads outside the bytes it is given, and needs no
 * NUL terminator. */
#ifndef KEEL_SERVE_HTTP_HEAD_H
#define KEEL_SERVE_HTTP_HEAD_H

#include <stdbool.h>
#include <stddef.h>

/* The parts of a request head the server looks at; the pointers point into
 * the parsed bytes. */
typedef struct keel__http_req {
  const char *method, *path, *query; /* query: after '?', NULL without */
  size_t method_len, path_len, query_len;
  int minor;     /* HTTP/1.<minor> */
  int hosts;     /* Host fields */
  bool has_body; /* Content-Length > 0 or Transfer-Encoding */
  bool conn_close, conn_upgrade, upgrade_ws;
  bool ws_key, ws_version_13;
  const char *auth; /* Authorization value, NULL without */
  size_t auth_len;
} keel__http_req;

typedef enum keel__http_scan_result {
  KEEL__HTTP_MORE, /* no end of head yet, and nothing wrong so far */
  KEEL__HTTP_HEAD, /* a head ends at *head_len */
  KEEL__HTTP_BAD   /* cannot be a request head: answer 400 */
} keel__http_scan_result;

/* The number of bytes of empty lines (CRLF) at the start of in[0..len):
 * they are dropped before a request line (RFC 9112 2.2). */
size_t keel__http_leading_empty_lines(const char *in, size_t len);

/* Where a scan over a growing head got to; zero it (or set it to
 * KEEL__HTTP_SCANNER_INIT) for each new request. */
typedef struct keel__http_scanner {
  size_t scanned;   /* bytes checked for control bytes and the end of the head */
  size_t line_pos;  /* bytes of the request line checked */
  int line_phase;   /* how far the request line got (http_head.c) */
  size_t ver_index; /* within "HTTP/1." */
} keel__http_scanner;

/* Looks for the end of a request head (the empty line) in in[0..len), which
 * starts with the request line. `sc` remembers how far earlier calls over
 * the same growing bytes got, so that bytes arriving one by one are not
 * scanned again and again. HEAD sets *head_len (the head with its empty
 * line). BAD: control bytes, a bare LF, or a first line that cannot begin a
 * request line (checked as bytes arrive, so that junk is answered at once
 * rather than at the size limit or the timeout). */
keel__http_scan_result keel__http_scan(keel__http_scanner *sc, const char *in, size_t len,
                                       size_t *head_len);

/* Parses the head p[0..n) (ending in the empty line) into *r. Returns false
 * for anything that is not a well-formed HTTP/1.0 or 1.1 request head:
 * request line, field names as tokens, no obs-fold, no control bytes in
 * values, percent escapes in the target complete, Content-Length digits. */
bool keel__http_parse_head(const char *p, size_t n, keel__http_req *r);

/* Whether a[0..n) equals the NUL-terminated lit, in any case. */
bool keel__http_ieq(const char *a, size_t n, const char *lit);

/* The value of the query argument `name` (e.g. "token"), percent-decoded
 * into out[0..cap); *out_len its length. False when the query has no such
 * argument or its value does not fit. The query must come from
 * keel__http_parse_head() (its escapes are complete). */
bool keel__http_query_arg(const keel__http_req *r, const char *name, char *out, size_t cap,
                          size_t *out_len);

#endif
