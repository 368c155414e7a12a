/* redis:// and unix:// URLs. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/alloc.h"
#include "redis/redis_internal.h"

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Copies s[0..len) decoding %XX; NULL on allocation failure or a bad
 * escape (*bad set). */
static char *decode(const char *s, size_t len, bool *bad) {
  char *out = keel__malloc(len + 1);
  if (out == NULL) return NULL;
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    if (s[i] == '%') {
      if (i + 2 >= len || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0) {
        *bad = true;
        keel__free(out);
        return NULL;
      }
      out[o++] = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
      i += 2;
    } else {
      out[o++] = s[i];
    }
  }
  out[o] = '\0';
  return out;
}

static int parse_int(const char *s, size_t len, long lo, long hi, int *out) {
  char buf[16];
  if (len == 0 || len >= sizeof buf) return -1;
  memcpy(buf, s, len);
  buf[len] = '\0';
  for (size_t i = 0; i < len; i++)
    if (buf[i] < '0' || buf[i] > '9') return -1;
  errno = 0;
  char *end = NULL;
  long v = strtol(buf, &end, 10);
  if (errno != 0 || end == NULL || *end != '\0' || v < lo || v > hi) return -1;
  *out = (int)v;
  return 0;
}

void keel__redis_url_free(keel__redis_url *u) {
  if (u == NULL) return;
  keel__free(u->host);
  keel__free(u->path);
  keel__free(u->user);
  keel__free(u->password);
  memset(u, 0, sizeof *u);
}

int keel__redis_url_parse(const char *url, keel__redis_url *out, char *errbuf) {
  keel__redis_url u;
  memset(&u, 0, sizeof u);
  u.port = 6379;
  bool is_unix;
  const char *p;
  /* URL schemes are case-insensitive (RFC 3986 section 3.1) */
  if (strncasecmp(url, "redis://", 8) == 0) {
    is_unix = false;
    p = url + 8;
  } else if (strncasecmp(url, "unix://", 7) == 0) {
    is_unix = true;
    p = url + 7;
  } else {
    return keel__fail(errbuf, UV_EINVAL, "url must start with redis:// or unix://");
  }
  bool bad = false;
  int rc = UV_ENOMEM;
  /* userinfo: up to the last '@' before the path / query */
  const char *stop = p + strcspn(p, is_unix ? "?" : "/?");
  const char *at = NULL;
  for (const char *q = p; q < stop; q++)
    if (*q == '@') at = q;
  if (at != NULL) {
    const char *colon = memchr(p, ':', (size_t)(at - p));
    if (colon == NULL) {
      /* "user@" without a password: an ACL user needs one */
      return keel__fail(errbuf, UV_EINVAL, "url: user without :password");
    }
    if (colon + 1 == at) {
      /* ":@": an empty password means no AUTH; a user needs a password */
      if (colon > p) return keel__fail(errbuf, UV_EINVAL, "url: user with an empty password");
      p = at + 1;
      goto host;
    }
    if (colon > p) {
      u.user = decode(p, (size_t)(colon - p), &bad);
      if (u.user == NULL) goto fail;
    }
    u.password = decode(colon + 1, (size_t)(at - colon - 1), &bad);
    if (u.password == NULL) goto fail;
    p = at + 1;
  }
host:
  if (is_unix) {
    size_t plen = strcspn(p, "?");
    if (plen == 0 || p[0] != '/') {
      rc = keel__fail(errbuf, UV_EINVAL, "url: unix:// needs an absolute socket path");
      goto fail_set;
    }
    u.path = decode(p, plen, &bad);
    if (u.path == NULL) goto fail;
    p += plen;
    if (*p == '?') {
      p++;
      while (*p != '\0') {
        size_t n = strcspn(p, "&");
        if (n > 3 && strncmp(p, "db=", 3) == 0) {
          if (parse_int(p + 3, n - 3, 0, 65535, &u.db) != 0) {
            rc = keel__fail(errbuf, UV_EINVAL, "url: db must be 0..65535");
            goto fail_set;
          }
        } else {
          rc = keel__fail(errbuf, UV_EINVAL, "url: unknown query parameter (only db=N)");
          goto fail_set;
        }
        p += n;
        if (*p == '&') p++;
      }
    }
  } else {
    const char *hend;
    const char *hstart = p;
    if (*p == '[') {
      hend = strchr(p, ']');
      if (hend == NULL) {
        rc = keel__fail(errbuf, UV_EINVAL, "url: unterminated [IPv6] host");
        goto fail_set;
      }
      hstart = p + 1;
      p = hend + 1;
    } else {
      hend = p + strcspn(p, ":/?");
      p = hend;
    }
    if (hend == hstart) {
      rc = keel__fail(errbuf, UV_EINVAL, "url: no host");
      goto fail_set;
    }
    u.host = keel__strndup(hstart, (size_t)(hend - hstart));
    if (u.host == NULL) goto fail;
    if (*p == ':') {
      p++;
      size_t n = strcspn(p, "/?");
      if (parse_int(p, n, 1, 65535, &u.port) != 0) {
        rc = keel__fail(errbuf, UV_EINVAL, "url: port must be 1..65535");
        goto fail_set;
      }
      p += n;
    }
    if (*p == '/') {
      p++;
      size_t n = strcspn(p, "?");
      if (n > 0 && parse_int(p, n, 0, 65535, &u.db) != 0) {
        rc = keel__fail(errbuf, UV_EINVAL, "url: db must be 0..65535");
        goto fail_set;
      }
      p += n;
    }
    if (*p != '\0') {
      rc = keel__fail(errbuf, UV_EINVAL, "url: unexpected text after the database number");
      goto fail_set;
    }
  }
  *out = u;
  return 0;
fail:
  rc = bad ? keel__fail(errbuf, UV_EINVAL, "url: bad %%XX escape") : UV_ENOMEM;
fail_set:
  keel__redis_url_free(&u);
  return rc;
}
