/* Small helpers of the durable queue: parameter buffers, name checks and a
 * JSON syntax check (so a bad payload is refused before anything is sent,
 * without aborting the caller's transaction). */
#include <stdarg.h>
#include <stdio.h>

#include "pgqueue_internal.h"

static void buf_reserve(keel__pgq_buf *b, size_t extra) {
  if (b->err != 0) return;
  if (b->len + extra + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra + 1) cap *= 2;
  char *p = keel__realloc(b->p, cap);
  if (p == NULL) {
    b->err = UV_ENOMEM;
    return;
  }
  b->p = p;
  b->cap = cap;
}

void keel__pgq_buf_put(keel__pgq_buf *b, const char *s, size_t n) {
  buf_reserve(b, n);
  if (b->err != 0) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

void keel__pgq_buf_str(keel__pgq_buf *b, const char *s) {
  keel__pgq_buf_put(b, s, strlen(s));
}

void keel__pgq_buf_fmt(keel__pgq_buf *b, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= sizeof tmp) {
    b->err = UV_EINVAL;
    return;
  }
  keel__pgq_buf_put(b, tmp, (size_t)n);
}

void keel__pgq_buf_elem(keel__pgq_buf *b, const char *s) {
  if (s == NULL) {
    keel__pgq_buf_str(b, "NULL");
    return;
  }
  keel__pgq_buf_put(b, "\"", 1);
  const char *run = s;
  for (const char *c = s; *c; c++) {
    if (*c == '"' || *c == '\\') {
      keel__pgq_buf_put(b, run, (size_t)(c - run));
      keel__pgq_buf_put(b, "\\", 1);
      run = c;
    }
  }
  keel__pgq_buf_str(b, run);
  keel__pgq_buf_put(b, "\"", 1);
}

void keel__pgq_buf_free(keel__pgq_buf *b) {
  keel__free(b->p);
  memset(b, 0, sizeof *b);
}

int keel__pgq_valid_queue(const char *s) {
  if (s == NULL) return UV_EINVAL;
  size_t n = strlen(s);
  if (n == 0 || n > KEEL_PGQUEUE_MAX_NAME) return UV_EINVAL;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == ':' || c == '-';
    if (!ok) return UV_EINVAL;
  }
  return 0;
}

int keel__pgq_valid_schema(const char *s) {
  if (s == NULL) return UV_EINVAL;
  size_t n = strlen(s);
  if (n == 0 || n > 40) return UV_EINVAL;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || c == '_' || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return UV_EINVAL;
  }
  return 0;
}

/* ---- JSON syntax (RFC 8259), depth-limited ---------------------------- */

typedef struct jp {
  const char *s;
  int depth;
} jp;

static void ws(jp *p) {
  while (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r') p->s++;
}

static bool value(jp *p);

static bool hex4(const char *s) {
  for (int i = 0; i < 4; i++) {
    char c = s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return false;
  }
  return true;
}

static bool string(jp *p) {
  if (*p->s != '"') return false;
  p->s++;
  for (;;) {
    unsigned char c = (unsigned char)*p->s;
    if (c == '\0' || c < 0x20) return false;
    if (c == '"') {
      p->s++;
      return true;
    }
    if (c == '\\') {
      p->s++;
      char e = *p->s;
      if (e == 'u') {
        if (!hex4(p->s + 1)) return false;
        if (strncmp(p->s + 1, "0000", 4) == 0) return false; /* jsonb refuses \u0000 */
        p->s += 5;
        continue;
      }
      if (!strchr("\"\\/bfnrt", e) || e == '\0') return false;
      p->s++;
      continue;
    }
    p->s++;
  }
}

static bool number(jp *p) {
  const char *s = p->s;
  if (*s == '-') s++;
  if (*s == '0') {
    s++;
  } else if (*s >= '1' && *s <= '9') {
    while (*s >= '0' && *s <= '9') s++;
  } else {
    return false;
  }
  if (*s == '.') {
    s++;
    if (!(*s >= '0' && *s <= '9')) return false;
    while (*s >= '0' && *s <= '9') s++;
  }
  if (*s == 'e' || *s == 'E') {
    s++;
    if (*s == '+' || *s == '-') s++;
    if (!(*s >= '0' && *s <= '9')) return false;
    while (*s >= '0' && *s <= '9') s++;
  }
  p->s = s;
  return true;
}

static bool value(jp *p) {
  ws(p);
  char c = *p->s;
  if (c == '{' || c == '[') {
    if (++p->depth > 256) return false;
    char close = c == '{' ? '}' : ']';
    p->s++;
    ws(p);
    if (*p->s == close) {
      p->s++;
      p->depth--;
      return true;
    }
    for (;;) {
      if (c == '{') {
        ws(p);
        if (!string(p)) return false;
        ws(p);
        if (*p->s != ':') return false;
        p->s++;
      }
      if (!value(p)) return false;
      ws(p);
      if (*p->s == ',') {
        p->s++;
        continue;
      }
      if (*p->s != close) return false;
      p->s++;
      p->depth--;
      return true;
    }
  }
  if (c == '"') return string(p);
  if (strncmp(p->s, "true", 4) == 0) return (p->s += 4), true;
  if (strncmp(p->s, "false", 5) == 0) return (p->s += 5), true;
  if (strncmp(p->s, "null", 4) == 0) return (p->s += 4), true;
  return number(p);
}

bool keel__pgq_valid_json(const char *s) {
  if (s == NULL) return false;
  jp p = {s, 0};
  if (!value(&p)) return false;
  ws(&p);
  return *p.s == '\0';
}
