/* Fuzz target: the server's HTTP request-head reader (src/serve/http_head.c).
 * The bytes are fed to the scanner in pieces (sizes drawn from the input)
 * and must give the same answer as one scan over all of them; a head it
 * finds is parsed; parsing and the query reader are also run on the raw
 * bytes and on the bytes spliced into a valid request. Each piece is its
 * own allocation of exactly its size, so that AddressSanitizer sees any
 * read past the bytes given. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "serve/http_head.h"

static void check_parsed(const keel__http_req *r, const char *p, size_t n) {
  if (r->method != p || r->method_len == 0 || r->method_len >= n) abort();
  if (r->path < p || r->path + r->path_len > p + n || r->path[0] != '/') abort();
  if (r->query != NULL && (r->query < p || r->query + r->query_len > p + n)) abort();
  if (r->auth != NULL && (r->auth < p || r->auth + r->auth_len > p + n)) abort();
  if (r->minor != 0 && r->minor != 1) abort();
  char out[16];
  size_t len = 0;
  if (keel__http_query_arg(r, "token", out, sizeof out, &len) && len > sizeof out) abort();
}

/* One scan over p[0..n). */
static keel__http_scan_result whole(const char *p, size_t n, size_t *head_len) {
  keel__http_scanner sc;
  memset(&sc, 0, sizeof sc);
  return keel__http_scan(&sc, p, n, head_len);
}

static void scan_in_pieces(const uint8_t *data, size_t size) {
  if (size < 2) return;
  size_t step = (size_t)data[0] % 7 + 1; /* bytes added per call */
  const char *p = (const char *)data + 1;
  size_t n = size - 1;
  size_t head_whole = 0;
  keel__http_scan_result all = whole(p, n, &head_whole);
  keel__http_scanner sc;
  memset(&sc, 0, sizeof sc);
  keel__http_scan_result got = KEEL__HTTP_MORE;
  size_t head = 0, len = 0;
  while (len < n && got == KEEL__HTTP_MORE) {
    len = len + step < n ? len + step : n;
    char *copy = malloc(len);
    if (copy == NULL) return;
    memcpy(copy, p, len);
    got = keel__http_scan(&sc, copy, len, &head);
    if (got == KEEL__HTTP_HEAD) {
      if (head > len) abort();
      keel__http_req r;
      if (keel__http_parse_head(copy, head, &r)) check_parsed(&r, copy, head);
    }
    free(copy);
  }
  /* Pieces or not, the same head is found. */
  if (got == KEEL__HTTP_HEAD && (all != KEEL__HTTP_HEAD || head != head_whole)) abort();
  /* Junk seen early in the request line: one scan finds the head's end
   * first, but the head must then fail to parse (400 either way). */
  keel__http_req r;
  if (got == KEEL__HTTP_BAD && all == KEEL__HTTP_HEAD && keel__http_parse_head(p, head_whole, &r))
    abort();
  if (got == KEEL__HTTP_MORE && all != KEEL__HTTP_MORE) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  scan_in_pieces(data, size);
  char *raw = malloc(size ? size : 1);
  if (raw == NULL) return 0;
  memcpy(raw, data, size);
  keel__http_req r;
  if (keel__http_parse_head(raw, size, &r)) check_parsed(&r, raw, size);
  free(raw);
  /* The bytes as a target and as a header value of an otherwise valid head. */
  static const char a[] = "GET /",
                    b[] = " HTTP/1.1\r\nHost: h\r\nAuthorization: ", c[] = "\r\n\r\n";
  size_t n = sizeof a - 1 + size + sizeof b - 1 + size + sizeof c - 1;
  char *req = malloc(n);
  if (req == NULL) return 0;
  char *w = req;
  memcpy(w, a, sizeof a - 1), w += sizeof a - 1;
  memcpy(w, data, size), w += size;
  memcpy(w, b, sizeof b - 1), w += sizeof b - 1;
  memcpy(w, data, size), w += size;
  memcpy(w, c, sizeof c - 1);
  if (keel__http_parse_head(req, n, &r)) check_parsed(&r, req, n);
  size_t head = 0;
  if (whole(req, n, &head) == KEEL__HTTP_HEAD && head > n) abort();
  free(req);
  return 0;
}
