/* The HTTP/1.x request-head reader of the server: finding the end of a
 * head as bytes arrive, and parsing a complete one. No I/O, no allocation;
 * never reads outside the bytes given. */
#include "serve/http_head.h"

#include <stdint.h>
#include <string.h>
#include <strings.h>

static bool is_tchar(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static bool is_hex(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int hex_val(unsigned char c) {
  return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
}

/* A visible ASCII byte, as a request target may hold. */
static bool is_vchar(unsigned char c) {
  return c > 0x20 && c < 0x7f;
}

bool keel__http_ieq(const char *a, size_t n, const char *lit) {
  return strlen(lit) == n && strncasecmp(a, lit, n) == 0;
}

/* Whether the comma-separated list v (n bytes) holds token tok (any
 * case). */
static bool has_token(const char *v, size_t n, const char *tok) {
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
    size_t b = i;
    while (i < n && v[i] != ',') i++;
    size_t e = i;
    while (e > b && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
    if (e > b && keel__http_ieq(v + b, e - b, tok)) return true;
  }
  return false;
}

size_t keel__http_leading_empty_lines(const char *in, size_t len) {
  size_t skip = 0;
  while (len - skip >= 2 && in[skip] == '\r' && in[skip + 1] == '\n') skip += 2;
  return skip;
}

/* The request line's parts, in the order they come. */
enum {
  LINE_METHOD,
  LINE_SLASH, /* after the method's space: the target's '/' */
  LINE_TARGET,
  LINE_VERSION, /* "HTTP/1." */
  LINE_MINOR,
  LINE_CR,
  LINE_LF,
  LINE_DONE
};

/* Advances the request-line check over in[sc->line_pos..len); false as
 * soon as the bytes cannot begin a request line. */
static bool line_prefix_ok(keel__http_scanner *sc, const char *in, size_t len) {
  static const char ver[] = "HTTP/1.";
  for (; sc->line_pos < len && sc->line_phase != LINE_DONE; sc->line_pos++) {
    unsigned char c = (unsigned char)in[sc->line_pos];
    switch (sc->line_phase) {
      case LINE_METHOD:
        if (is_tchar(c)) break;
        if (sc->line_pos == 0 || c != ' ') return false;
        sc->line_phase = LINE_SLASH;
        break;
      case LINE_SLASH:
        if (c != '/') return false;
        sc->line_phase = LINE_TARGET;
        break;
      case LINE_TARGET:
        if (is_vchar(c)) break;
        if (c != ' ') return false;
        sc->line_phase = LINE_VERSION;
        sc->ver_index = 0;
        break;
      case LINE_VERSION:
        if (c != (unsigned char)ver[sc->ver_index]) return false;
        if (++sc->ver_index == sizeof ver - 1) sc->line_phase = LINE_MINOR;
        break;
      case LINE_MINOR:
        if (c != '0' && c != '1') return false;
        sc->line_phase = LINE_CR;
        break;
      case LINE_CR:
        if (c != '\r') return false;
        sc->line_phase = LINE_LF;
        break;
      default: /* LINE_LF */
        if (c != '\n') return false;
        sc->line_phase = LINE_DONE;
        break;
    }
  }
  return true;
}

keel__http_scan_result keel__http_scan(keel__http_scanner *sc, const char *in, size_t len,
                                       size_t *head_len) {
  /* a CR that may begin an empty line before the request line */
  if (len == 1 && in[0] == '\r' && sc->line_pos == 0) return KEEL__HTTP_MORE;
  for (size_t i = sc->scanned; i < len; i++) {
    unsigned char ch = (unsigned char)in[i];
    if (ch == '\n' && i + 2 < len && in[i + 1] == '\r' && in[i + 2] == '\n') {
      *head_len = i + 3;
      return KEEL__HTTP_HEAD;
    }
    if (ch == '\n' && i + 1 < len && in[i + 1] == '\n') return KEEL__HTTP_BAD; /* a bare LF */
    if ((ch < 0x20 && ch != '\t' && ch != '\r' && ch != '\n') || ch == 0x7f)
      return KEEL__HTTP_BAD; /* control bytes */
  }
  /* an LF in the last two bytes is decided when more comes */
  sc->scanned = len > 2 ? len - 2 : 0;
  return line_prefix_ok(sc, in, len) ? KEEL__HTTP_MORE : KEEL__HTTP_BAD;
}

bool keel__http_parse_head(const char *p, size_t n, keel__http_req *r) {
  memset(r, 0, sizeof *r);
  size_t i = 0;
  /* request line */
  r->method = p;
  while (i < n && is_tchar((unsigned char)p[i])) i++;
  r->method_len = i;
  if (i == 0 || i >= n || p[i] != ' ') return false;
  size_t t = ++i;
  if (i >= n || p[i] != '/') return false;
  while (i < n && is_vchar((unsigned char)p[i])) {
    if (p[i] == '%' &&
        !(i + 2 < n && is_hex((unsigned char)p[i + 1]) && is_hex((unsigned char)p[i + 2])))
      return false;
    i++;
  }
  if (i >= n || p[i] != ' ') return false;
  r->path = p + t;
  const char *q = memchr(p + t, '?', i - t);
  r->path_len = q ? (size_t)(q - (p + t)) : i - t;
  if (q) {
    r->query = q + 1;
    r->query_len = (size_t)(p + i - r->query);
  }
  i++;
  if (n - i < 10 || memcmp(p + i, "HTTP/1.", 7) != 0 || (p[i + 7] != '0' && p[i + 7] != '1') ||
      p[i + 8] != '\r' || p[i + 9] != '\n')
    return false;
  r->minor = p[i + 7] - '0';
  i += 10;
  /* header fields, up to the empty line */
  for (;;) {
    if (n - i < 2) return false;
    if (p[i] == '\r' && p[i + 1] == '\n') return i + 2 == n;
    size_t b = i;
    while (i < n && is_tchar((unsigned char)p[i])) i++;
    if (i == b || i >= n || p[i] != ':') return false; /* also obs-fold, space before ':' */
    size_t name_len = i - b;
    i++;
    while (i < n && (p[i] == ' ' || p[i] == '\t')) i++;
    size_t vb = i;
    while (i < n && p[i] != '\r' && p[i] != '\n') {
      unsigned char c = (unsigned char)p[i];
      if ((c < 0x20 && c != '\t') || c == 0x7f) return false;
      i++;
    }
    if (n - i < 2 || p[i] != '\r' || p[i + 1] != '\n') return false;
    size_t ve = i;
    while (ve > vb && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
    const char *name = p + b, *v = p + vb;
    size_t vlen = ve - vb;
    if (keel__http_ieq(name, name_len, "host")) {
      r->hosts++;
    } else if (keel__http_ieq(name, name_len, "content-length")) {
      if (vlen == 0 || vlen > 18) return false;
      uint64_t cl = 0;
      for (size_t k = 0; k < vlen; k++) {
        if (v[k] < '0' || v[k] > '9') return false;
        cl = cl * 10 + (uint64_t)(v[k] - '0');
      }
      if (cl > 0) r->has_body = true;
    } else if (keel__http_ieq(name, name_len, "transfer-encoding")) {
      r->has_body = true;
    } else if (keel__http_ieq(name, name_len, "connection")) {
      if (has_token(v, vlen, "close")) r->conn_close = true;
      if (has_token(v, vlen, "upgrade")) r->conn_upgrade = true;
    } else if (keel__http_ieq(name, name_len, "upgrade")) {
      if (has_token(v, vlen, "websocket")) r->upgrade_ws = true;
    } else if (keel__http_ieq(name, name_len, "sec-websocket-key")) {
      r->ws_key = vlen > 0;
    } else if (keel__http_ieq(name, name_len, "sec-websocket-version")) {
      r->ws_version_13 = vlen == 2 && memcmp(v, "13", 2) == 0;
    } else if (keel__http_ieq(name, name_len, "authorization")) {
      r->auth = v;
      r->auth_len = vlen;
    }
    i += 2;
  }
}

bool keel__http_query_arg(const keel__http_req *r, const char *name, char *out, size_t cap,
                          size_t *out_len) {
  size_t name_len = strlen(name);
  const char *q = r->query, *end = q ? q + r->query_len : NULL;
  while (q != NULL && q < end) {
    const char *amp = memchr(q, '&', (size_t)(end - q));
    const char *arg_end = amp ? amp : end;
    if ((size_t)(arg_end - q) > name_len && memcmp(q, name, name_len) == 0 && q[name_len] == '=') {
      size_t n = 0;
      for (const char *c = q + name_len + 1; c < arg_end; c++) {
        if (n == cap) return false;
        if (*c == '%' && arg_end - c >= 3) { /* escapes were checked by parse_head() */
          out[n++] = (char)(hex_val((unsigned char)c[1]) * 16 + hex_val((unsigned char)c[2]));
          c += 2;
        } else {
          out[n++] = *c;
        }
      }
      *out_len = n;
      return true;
    }
    q = amp ? amp + 1 : NULL;
  }
  return false;
}
