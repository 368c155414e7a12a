#include "listen/change.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/alloc.h"

/* ---- the reader ---------------------------------------------------------- */

typedef struct reader {
  char *s; /* working text, NUL-terminated; strings are unescaped in place */
  size_t at;
  keel_change *c;
  const char *error; /* first error, static text */
  bool nomem;
  size_t len; /* strlen(s) when known (16 bytes at a time below it), else 0 */
} reader;

static bool fail(reader *r, const char *error) {
  if (r->error == NULL) r->error = error;
  return false;
}

/* Byte classes, one lookup per byte: JSON white space, and the bytes that
 * end a run of plain string bytes ('"', '\\', NUL and the other control
 * characters). */
enum { CLASS_WS = 1, CLASS_STRING_STOP = 2 };
static const unsigned char byte_class[256] = {
    [0] = CLASS_STRING_STOP,
    [1] = CLASS_STRING_STOP,
    [2] = CLASS_STRING_STOP,
    [3] = CLASS_STRING_STOP,
    [4] = CLASS_STRING_STOP,
    [5] = CLASS_STRING_STOP,
    [6] = CLASS_STRING_STOP,
    [7] = CLASS_STRING_STOP,
    [8] = CLASS_STRING_STOP,
    ['\t'] = CLASS_STRING_STOP | CLASS_WS,
    ['\n'] = CLASS_STRING_STOP | CLASS_WS,
    [11] = CLASS_STRING_STOP,
    [12] = CLASS_STRING_STOP,
    ['\r'] = CLASS_STRING_STOP | CLASS_WS,
    [14] = CLASS_STRING_STOP,
    [15] = CLASS_STRING_STOP,
    [16] = CLASS_STRING_STOP,
    [17] = CLASS_STRING_STOP,
    [18] = CLASS_STRING_STOP,
    [19] = CLASS_STRING_STOP,
    [20] = CLASS_STRING_STOP,
    [21] = CLASS_STRING_STOP,
    [22] = CLASS_STRING_STOP,
    [23] = CLASS_STRING_STOP,
    [24] = CLASS_STRING_STOP,
    [25] = CLASS_STRING_STOP,
    [26] = CLASS_STRING_STOP,
    [27] = CLASS_STRING_STOP,
    [28] = CLASS_STRING_STOP,
    [29] = CLASS_STRING_STOP,
    [30] = CLASS_STRING_STOP,
    [31] = CLASS_STRING_STOP,
    [' '] = CLASS_WS,
    ['"'] = CLASS_STRING_STOP,
    ['\\'] = CLASS_STRING_STOP,
};

static void skip_ws(reader *r) {
  while (byte_class[(unsigned char)r->s[r->at]] & CLASS_WS) r->at++;
}

static int hex_value(char ch) {
  if (ch >= '0' && ch <= '9') return ch - '0';
  if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
  if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
  return -1;
}

static bool read_hex4(reader *r, size_t at, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    int h = hex_value(r->s[at + (size_t)i]);
    if (h < 0) return false;
    v = v * 16 + (unsigned)h;
  }
  *out = v;
  return true;
}

/* The first byte at or after `in` that ends a run of plain string bytes
 * ('"', '\\', a control character or the NUL). With SSE2, 16 bytes per
 * step while 16 remain before len (never past the text); one table lookup
 * per byte for the rest. */
static size_t string_stop(const char *s, size_t in, size_t len) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
  const __m128i control = _mm_set1_epi8(0x1F);
  while (in + 16 <= len) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(s + in));
    __m128i stop =
        _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                     _mm_cmpeq_epi8(_mm_max_epu8(v, control), control));
    unsigned mask = (unsigned)_mm_movemask_epi8(stop);
    if (mask != 0) return in + (size_t)__builtin_ctz(mask);
    in += 16;
  }
#else
  (void)len;
#endif
  while (!(byte_class[(unsigned char)s[in]] & CLASS_STRING_STOP)) in++;
  return in;
}

/* Reads a string at r->at (the opening quote). With decode, unescapes it in
 * place and NUL-terminates it (*out: its first byte); without, only checks
 * it. Bytes before the first escape stay where they are (nothing moves
 * until an escape shortens the text). */
static bool read_string(reader *r, bool decode, char **out) {
  size_t in = ++r->at, begin = in;
  char *s = r->s;
  in = string_stop(s, in, r->len);
  size_t outpos = in;
  for (;;) {
    unsigned char ch = (unsigned char)s[in];
    if (ch == '"') break;
    if (ch == '\0') return fail(r, "unterminated string");
    if (ch < 0x20) return fail(r, "control character in a string");
    if (ch != '\\') {
      if (decode) s[outpos++] = (char)ch;
      in++;
      continue;
    }
    char esc = s[in + 1];
    char simple = esc == '"'    ? '"'
                  : esc == '\\' ? '\\'
                  : esc == '/'  ? '/'
                  : esc == 'b'  ? '\b'
                  : esc == 'f'  ? '\f'
                  : esc == 'n'  ? '\n'
                  : esc == 'r'  ? '\r'
                  : esc == 't'  ? '\t'
                                : 0;
    if (simple != 0) {
      if (decode) s[outpos++] = simple;
      in += 2;
      continue;
    }
    if (esc != 'u') return fail(r, "bad escape in a string");
    unsigned cp;
    if (!read_hex4(r, in + 2, &cp)) return fail(r, "bad \\u escape");
    in += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      unsigned low;
      if (s[in] != '\\' || s[in + 1] != 'u' || !read_hex4(r, in + 2, &low) || low < 0xDC00 ||
          low > 0xDFFF)
        return fail(r, "unpaired surrogate");
      in += 6;
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
      return fail(r, "unpaired surrogate");
    }
    if (cp == 0) return fail(r, "\\u0000 in a string");
    if (!decode) continue;
    /* UTF-8 is never longer than the escape it comes from (6 or 12 bytes). */
    if (cp < 0x80) {
      s[outpos++] = (char)cp;
    } else if (cp < 0x800) {
      s[outpos++] = (char)(0xC0 | (cp >> 6));
      s[outpos++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s[outpos++] = (char)(0xE0 | (cp >> 12));
      s[outpos++] = (char)(0x80 | ((cp >> 6) & 0x3F));
      s[outpos++] = (char)(0x80 | (cp & 0x3F));
    } else {
      s[outpos++] = (char)(0xF0 | (cp >> 18));
      s[outpos++] = (char)(0x80 | ((cp >> 12) & 0x3F));
      s[outpos++] = (char)(0x80 | ((cp >> 6) & 0x3F));
      s[outpos++] = (char)(0x80 | (cp & 0x3F));
    }
  }
  r->at = in + 1;
  if (decode) {
    s[outpos] = '\0'; /* at or before the closing quote, already read */
    *out = s + begin;
  }
  return true;
}

static bool is_digit(char ch) {
  return ch >= '0' && ch <= '9';
}

/* JSON number grammar; *integer tells whether it had no fraction/exponent. */
static bool read_number(reader *r, bool *integer) {
  const char *s = r->s;
  size_t i = r->at;
  *integer = true;
  if (s[i] == '-') i++;
  if (s[i] == '0') {
    i++;
  } else if (s[i] >= '1' && s[i] <= '9') {
    while (is_digit(s[i])) i++;
  } else {
    return fail(r, "bad number");
  }
  if (s[i] == '.') {
    *integer = false;
    i++;
    if (!is_digit(s[i])) return fail(r, "bad number");
    while (is_digit(s[i])) i++;
  }
  if (s[i] == 'e' || s[i] == 'E') {
    *integer = false;
    i++;
    if (s[i] == '+' || s[i] == '-') i++;
    if (!is_digit(s[i])) return fail(r, "bad number");
    while (is_digit(s[i])) i++;
  }
  r->at = i;
  return true;
}

static bool read_literal(reader *r, const char *word) {
  const char *at = r->s + r->at;
  size_t n = 0;
  for (; word[n] != '\0'; n++) /* stops at the text's NUL: it differs */
    if (at[n] != word[n]) return fail(r, "bad literal");
  r->at += n;
  return true;
}

/* Checks any JSON value without keeping anything (inside nested values). */
static bool skip_value(reader *r, int depth) {
  skip_ws(r);
  char ch = r->s[r->at];
  bool integer;
  switch (ch) {
    case '"':
      return read_string(r, false, NULL);
    case 't':
      return read_literal(r, "true");
    case 'f':
      return read_literal(r, "false");
    case 'n':
      return read_literal(r, "null");
    case '{':
    case '[': {
      if (depth >= KEEL__CHANGE_MAX_DEPTH) return fail(r, "nested too deeply");
      char close = ch == '{' ? '}' : ']';
      r->at++;
      skip_ws(r);
      if (r->s[r->at] == close) {
        r->at++;
        return true;
      }
      for (;;) {
        if (ch == '{') {
          skip_ws(r);
          if (r->s[r->at] != '"') return fail(r, "expected a member name");
          if (!read_string(r, false, NULL)) return false;
          skip_ws(r);
          if (r->s[r->at] != ':') return fail(r, "expected ':'");
          r->at++;
        }
        if (!skip_value(r, depth + 1)) return false;
        skip_ws(r);
        if (r->s[r->at] == ',') {
          r->at++;
          continue;
        }
        if (r->s[r->at] == close) {
          r->at++;
          return true;
        }
        return fail(r, "expected ',' or the end of an object or array");
      }
    }
    default:
      return read_number(r, &integer);
  }
}

/* A value to keep: its kind, its start and (for numbers and nested values,
 * which are terminated later) its length. */
typedef struct value_span {
  keel__json_kind kind;
  bool integer; /* a number without fraction or exponent */
  char *start;
  size_t len;
} value_span;

static bool read_value(reader *r, value_span *v) {
  skip_ws(r);
  char ch = r->s[r->at];
  size_t start = r->at;
  v->len = 0;
  v->start = NULL;
  v->integer = false;
  switch (ch) {
    case '"':
      v->kind = KEEL__JSON_STRING;
      return read_string(r, true, &v->start);
    case 't':
      v->kind = KEEL__JSON_TRUE;
      v->start = (char *)"true";
      return read_literal(r, "true");
    case 'f':
      v->kind = KEEL__JSON_FALSE;
      v->start = (char *)"false";
      return read_literal(r, "false");
    case 'n':
      v->kind = KEEL__JSON_NULL;
      return read_literal(r, "null");
    case '{':
    case '[':
      v->kind = ch == '{' ? KEEL__JSON_OBJECT : KEEL__JSON_ARRAY;
      if (!skip_value(r, 1)) return false;
      break;
    default:
      v->kind = KEEL__JSON_NUMBER;
      if (!read_number(r, &v->integer)) return false;
      break;
  }
  v->start = r->s + start;
  v->len = r->at - start;
  return true;
}

static bool add_field(reader *r, const char *name, const value_span *v) {
  keel_change *c = r->c;
  if (c->field_count == c->field_cap) {
    uint32_t cap = c->field_cap * 2;
    keel__field *fields;
    if (c->fields == c->inline_fields) {
      fields = keel__calloc(cap, sizeof *fields);
      if (fields != NULL) memcpy(fields, c->fields, c->field_count * sizeof *fields);
    } else {
      fields = keel__realloc(c->fields, cap * sizeof *fields);
    }
    if (fields == NULL) {
      r->nomem = true;
      return fail(r, "out of memory");
    }
    c->fields = fields;
    c->field_cap = cap;
  }
  keel__field *f = &c->fields[c->field_count++];
  f->name = name;
  f->kind = v->kind;
  /* numbers and nested values are NUL-terminated once the whole document
   * is read (the byte after them is still needed until then) */
  f->value = v->kind == KEEL__JSON_NULL ? NULL : v->start;
  return true;
}

/* Where numbers and nested values end: NUL-terminated once the whole
 * document is read. Kept on the stack up to 64 (a row of that many such
 * columns), then grown on the heap: no allocation per change in the common
 * case, and none sized by the payload's length. */
typedef struct value_ends {
  char **at;
  size_t count, cap;
  char *small[64];
} value_ends;

static void ends_init(value_ends *e) {
  e->at = e->small;
  e->count = 0;
  e->cap = sizeof e->small / sizeof e->small[0];
}

/* The list is full: doubles it (on the heap past the first 64). */
static bool ends_grow(reader *r, value_ends *e) {
  size_t cap = e->cap * 2;
  char **at =
      e->at == e->small ? keel__malloc(cap * sizeof *at) : keel__realloc(e->at, cap * sizeof *at);
  if (at == NULL) {
    r->nomem = true;
    return fail(r, "out of memory");
  }
  if (e->at == e->small) memcpy(at, e->small, e->count * sizeof *at);
  e->at = at;
  e->cap = cap;
  return true;
}

static inline bool ends_push(reader *r, value_ends *e, char *end) {
  if (e->count == e->cap && !ends_grow(r, e)) return false;
  e->at[e->count++] = end;
  return true;
}

/* Terminates every value recorded and frees the list. */
static void ends_finish(value_ends *e) {
  for (size_t i = 0; i < e->count; i++) *e->at[i] = '\0';
  if (e->at != e->small) keel__free(e->at);
  e->at = e->small;
  e->count = 0;
}

/* Reads an object of columns into a row (r->at on '{'). */
static bool read_row(reader *r, keel__row *row, value_ends *ends) {
  row->first = r->c->field_count;
  row->count = 0;
  row->present = true;
  r->at++;
  skip_ws(r);
  if (r->s[r->at] == '}') {
    r->at++;
    return true;
  }
  for (;;) {
    skip_ws(r);
    if (r->s[r->at] != '"') return fail(r, "expected a column name");
    char *name;
    if (!read_string(r, true, &name)) return false;
    skip_ws(r);
    if (r->s[r->at] != ':') return fail(r, "expected ':'");
    r->at++;
    value_span v;
    if (!read_value(r, &v)) return false;
    if (v.len > 0 && !ends_push(r, ends, v.start + v.len)) return false;
    if (!add_field(r, name, &v)) return false;
    row->count++;
    skip_ws(r);
    if (r->s[r->at] == ',') {
      r->at++;
      continue;
    }
    if (r->s[r->at] == '}') {
      r->at++;
      return true;
    }
    return fail(r, "expected ',' or '}'");
  }
}

static int proto(char *why, size_t cap, const char *reason) {
  if (why != NULL && cap > 0) snprintf(why, cap, "malformed change payload: %s", reason);
  return KEEL_EPROTO;
}

static void reset(keel_change *c) {
  memset(c, 0, offsetof(keel_change, inline_fields));
  c->fields = c->inline_fields;
  c->field_cap = KEEL__CHANGE_INLINE_FIELDS;
}

enum {
  SEEN_OVERFLOW = 256,
  SEEN_OP = 1,
  SEEN_SCHEMA = 2,
  SEEN_TABLE = 4,
  SEEN_TS = 8,
  SEEN_PK = 16,
  SEEN_NEW = 32,
  SEEN_OLD = 64,
  SEEN_KEY_ONLY = 128
};

/* strcmp(a, b) == 0 for the short names compared per change, without a
 * call. */
static inline bool same(const char *a, const char *b) {
  while (*a == *b && *a != '\0') a++, b++;
  return *a == *b;
}

/* The SEEN_ bit of a member of the change object, 0 for any other name:
 * one comparison for each member instead of one per known name. */
static unsigned member_bit(const char *name) {
  const char *known;
  unsigned bit;
  switch (name[0]) {
    case 'o':
      known = name[1] == 'p' ? "op" : name[1] == 'l' ? "old" : "overflow";
      bit = name[1] == 'p' ? SEEN_OP : name[1] == 'l' ? SEEN_OLD : SEEN_OVERFLOW;
      break;
    case 's':
      known = "schema", bit = SEEN_SCHEMA;
      break;
    case 't':
      known = name[1] == 'a' ? "table" : "ts_us";
      bit = name[1] == 'a' ? SEEN_TABLE : SEEN_TS;
      break;
    case 'p':
      known = "pk", bit = SEEN_PK;
      break;
    case 'n':
      known = "new", bit = SEEN_NEW;
      break;
    case 'k':
      known = "key_only", bit = SEEN_KEY_ONLY;
      break;
    default:
      return 0;
  }
  return same(name, known) ? bit : 0;
}

/* A JSON integer's text (the reader checked its grammar: an optional '-'
 * and digits) as a value in 0..max; false when it has a fraction or an
 * exponent, is negative (but -0) or above max. */
static bool read_bounded(const char *s, int64_t max, int64_t *out) {
  bool negative = *s == '-';
  if (negative) s++;
  if (*s < '0' || *s > '9') return false;
  int64_t v = 0;
  for (; *s >= '0' && *s <= '9'; s++) {
    int digit = *s - '0';
    if (v > (max - digit) / 10) return false;
    v = v * 10 + digit;
  }
  if (*s != '\0' || (negative && v != 0)) return false;
  *out = v;
  return true;
}

static int parse_document(keel_change *c, char *work, char *why, size_t cap) {
  value_ends ends;
  ends_init(&ends);
  reader r = {work, 0, c, NULL, false, strlen(work)};
  unsigned seen = 0;
  const char *op = NULL;
  char *ts_start = NULL;
  char *overflow_start = NULL;
  bool ts_integer = false;
  skip_ws(&r);
  if (work[r.at] != '{') {
    fail(&r, work[r.at] == '\0' ? "empty" : "not a JSON object");
    goto done;
  }
  r.at++;
  skip_ws(&r);
  if (work[r.at] == '}') {
    r.at++;
  } else {
    for (;;) {
      skip_ws(&r);
      if (work[r.at] != '"') {
        fail(&r, "expected a member name");
        goto done;
      }
      char *name;
      if (!read_string(&r, true, &name)) goto done;
      skip_ws(&r);
      if (work[r.at] != ':') {
        fail(&r, "expected ':'");
        goto done;
      }
      r.at++;
      skip_ws(&r);
      unsigned bit = member_bit(name);
      if (bit & seen) {
        fail(&r, "a member appears twice");
        goto done;
      }
      seen |= bit;
      keel__row *row = bit == SEEN_PK    ? &c->key
                       : bit == SEEN_NEW ? &c->new_row
                       : bit == SEEN_OLD ? &c->old_row
                                         : NULL;
      if (row != NULL && work[r.at] == '{') {
        if (!read_row(&r, row, &ends)) goto done;
      } else {
        value_span v;
        if (!read_value(&r, &v)) goto done;
        if (v.len > 0 && !ends_push(&r, &ends, v.start + v.len)) goto done;
        if (row != NULL && (bit == SEEN_PK || v.kind != KEEL__JSON_NULL)) {
          fail(&r, bit == SEEN_PK    ? "\"pk\" is not an object"
                   : bit == SEEN_NEW ? "\"new\" is not an object"
                                     : "\"old\" is not an object");
          goto done;
        }
        if (bit == SEEN_OP || bit == SEEN_SCHEMA || bit == SEEN_TABLE) {
          if (v.kind != KEEL__JSON_STRING) {
            fail(&r, bit == SEEN_OP ? "\"op\" is not a string" : "no \"schema\" or \"table\"");
            goto done;
          }
          if (bit == SEEN_OP) op = v.start;
          if (bit == SEEN_SCHEMA) c->schema = v.start;
          if (bit == SEEN_TABLE) c->table = v.start;
        } else if (bit == SEEN_TS) {
          if (v.kind != KEEL__JSON_NUMBER) {
            fail(&r, "no integer \"ts_us\"");
            goto done;
          }
          ts_start = v.start;
          ts_integer = v.integer; /* no fraction, no exponent: '-' and digits only */
        } else if (bit == SEEN_KEY_ONLY) {
          c->key_only = v.kind == KEEL__JSON_TRUE;
        } else if (bit == SEEN_OVERFLOW) {
          if (v.kind != KEEL__JSON_NUMBER) {
            fail(&r, "\"overflow\" is not an id");
            goto done;
          }
          overflow_start = v.start;
        }
      }
      skip_ws(&r);
      if (work[r.at] == ',') {
        r.at++;
        continue;
      }
      if (work[r.at] == '}') {
        r.at++;
        break;
      }
      fail(&r, "expected ',' or '}'");
      goto done;
    }
  }
  skip_ws(&r);
  if (work[r.at] != '\0') fail(&r, "text after the JSON object");
done:
  /* terminate numbers and nested values now that nothing more is read */
  ends_finish(&ends);
  if (r.nomem) return UV_ENOMEM;
  if (r.error != NULL) {
    if (strcmp(r.error, "empty") == 0 || strcmp(r.error, "not a JSON object") == 0 ||
        strncmp(r.error, "\"", 1) == 0 || strncmp(r.error, "no ", 3) == 0)
      return proto(why, cap, r.error);
    char reason[96];
    snprintf(reason, sizeof reason, "not valid JSON (%s at byte %zu)", r.error, r.at);
    return proto(why, cap, reason);
  }
  if (op == NULL) return proto(why, cap, "no \"op\"");
  if (same(op, "INSERT"))
    c->op = KEEL_CHANGE_INSERT;
  else if (same(op, "UPDATE"))
    c->op = KEEL_CHANGE_UPDATE;
  else if (same(op, "DELETE"))
    c->op = KEEL_CHANGE_DELETE;
  else
    return proto(why, cap, "\"op\" is not INSERT, UPDATE or DELETE");
  if (c->schema == NULL || c->table == NULL) return proto(why, cap, "no \"schema\" or \"table\"");
  if (ts_start == NULL || !ts_integer) return proto(why, cap, "no integer \"ts_us\"");
  /* Anyone may NOTIFY on the channel: a time outside 1970..9999 is not
   * keel's, and would overflow the latency arithmetic. */
  if (!read_bounded(ts_start, KEEL__CHANGE_MAX_TIME_US, &c->time_us))
    return proto(why, cap, "\"ts_us\" out of range");
  if (c->key_only && !c->key.present) return proto(why, cap, "a key-only change without \"pk\"");
  if (overflow_start != NULL) {
    int64_t id;
    if (!read_bounded(overflow_start, INT64_MAX, &id) || id <= 0)
      return proto(why, cap, "\"overflow\" out of range");
    c->overflow_id = id;
  }
  return 0;
}

int keel__change_set_overflow(keel_change *c, char *payload, char *why, size_t cap) {
  keel__change_free(c);
  int rc = keel__change_parse(c, payload, why, cap);
  c->fetched_row = payload; /* the raw text the change points to */
  if (rc == 0 && c->overflow_id != 0) rc = proto(why, cap, "an overflow row points to another");
  c->fetched = rc == 0;
  return rc;
}

int keel__change_set_overflow_in(keel_change *c, const char *raw, char *work, char *why,
                                 size_t cap) {
  keel__change_free(c);
  int rc = keel__change_parse_in(c, raw, work, why, cap);
  c->fetched_row = work; /* what the change's fields point into */
  if (rc == 0 && c->overflow_id != 0) rc = proto(why, cap, "an overflow row points to another");
  c->fetched = rc == 0;
  return rc;
}

int keel__change_own_raw(keel_change *c) {
  if (c->raw == NULL || c->raw == c->owned_raw) return 0;
  char *copy = keel__strdup(c->raw);
  if (copy == NULL) return UV_ENOMEM;
  c->owned_raw = copy;
  c->raw = copy;
  return 0;
}

int keel__change_parse_in(keel_change *c, const char *payload, char *work, char *why, size_t cap) {
  reset(c);
  if (payload == NULL || work == NULL) return proto(why, cap, "empty");
  c->raw = payload;
  return parse_document(c, work, why, cap);
}

int keel__change_parse(keel_change *c, const char *payload, char *why, size_t cap) {
  reset(c);
  if (payload == NULL) return proto(why, cap, "empty");
  size_t len = strlen(payload);
  char *work = keel__malloc(len + 1);
  if (work == NULL) return UV_ENOMEM;
  memcpy(work, payload, len + 1);
  int rc = keel__change_parse_in(c, payload, work, why, cap);
  c->owned_work = work;
  return rc;
}

int keel__change_set_fetched(keel_change *c, char *row) {
  value_ends ends;
  ends_init(&ends);
  reader r = {row, 0, c, NULL, false, strlen(row)};
  uint32_t fields_before = c->field_count;
  keel__row parsed = {0, 0, false};
  skip_ws(&r);
  bool ok = row[r.at] == '{' && read_row(&r, &parsed, &ends);
  if (ok) {
    skip_ws(&r);
    ok = row[r.at] == '\0';
  }
  ends_finish(&ends);
  if (!ok) {
    c->field_count = fields_before;
    keel__free(row);
    return r.nomem ? UV_ENOMEM : KEEL_EPROTO;
  }
  keel__free(c->fetched_row);
  c->fetched_row = row;
  if (c->op == KEEL_CHANGE_DELETE)
    c->old_row = parsed;
  else
    c->new_row = parsed;
  c->fetched = true;
  return 0;
}

void keel__change_free(keel_change *c) {
  keel__text *t = c->texts;
  while (t != NULL) {
    keel__text *next = t->next;
    keel__free(t);
    t = next;
  }
  c->texts = NULL;
  if (c->fields != NULL && c->fields != c->inline_fields) keel__free(c->fields);
  c->fields = c->inline_fields;
  c->field_count = 0;
  keel__free(c->owned_work);
  c->owned_work = NULL;
  keel__free(c->owned_raw);
  c->owned_raw = NULL;
  keel__free(c->fetched_row);
  c->fetched_row = NULL;
}

static const char *text_form(keel_change *c, keel__field *f);

const char *keel__change_column(const keel_change *c, const keel__row *row, const char *column,
                                bool *present) {
  if (present != NULL) *present = false;
  if (row == NULL || !row->present || column == NULL) return NULL;
  for (uint32_t i = 0; i < row->count; i++) {
    keel__field *f = &c->fields[row->first + i];
    if (same(f->name, column)) {
      if (present != NULL) *present = true;
      /* The change is const to handlers; its cache of text forms is not part
       * of its value. */
      const char *converted = text_form((keel_change *)c, f);
      return converted != NULL ? converted : f->value;
    }
  }
  return NULL;
}

/* ---- text forms ---------------------------------------------------------- */

void keel__columns_free(keel__columns *cols) {
  for (size_t i = 0; i < cols->count; i++) {
    keel__free(cols->items[i].name);
    keel__free(cols->items[i].type);
  }
  keel__free(cols->items);
  cols->items = NULL;
  cols->count = 0;
  cols->as_is = false;
}

const keel__column *keel__columns_find(const keel__columns *cols, const char *name) {
  if (cols == NULL) return NULL;
  for (size_t i = 0; i < cols->count; i++)
    if (same(cols->items[i].name, name)) return &cols->items[i];
  return NULL;
}

/* XSD timestamp (to_jsonb) → ISO text output: the 'T' becomes a blank, and
 * for timestamptz an offset of whole hours loses its ":00". */
static bool timestamp_text(const char *s, bool tz, char *out, size_t cap) {
  size_t len = strlen(s);
  if (len + 1 > cap) return false;
  memcpy(out, s, len + 1);
  if (strcmp(s, "infinity") == 0 || strcmp(s, "-infinity") == 0) return true;
  char *t = strchr(out, 'T');
  if (t == NULL || t - out < 10 || t[-3] != '-') return false;
  *t = ' ';
  if (!tz) return true;
  /* the offset: the last '+' or '-' after the time */
  char *sign = NULL;
  for (char *p = t; *p != '\0'; p++)
    if (*p == '+' || *p == '-') sign = p;
  if (sign == NULL) return false;
  /* "+HH:MM" then end or " BC" */
  if (is_digit(sign[1]) && is_digit(sign[2]) && sign[3] == ':' && sign[4] == '0' &&
      sign[5] == '0' && (sign[6] == '\0' || sign[6] == ' '))
    memmove(sign + 3, sign + 6, strlen(sign + 6) + 1);
  return true;
}

typedef struct writer {
  char *out;
  size_t cap, at;
  bool full;
} writer;

static void w_put(writer *w, const char *text, size_t len) {
  if (w->full || w->at + len + 1 > w->cap) {
    w->full = true;
    return;
  }
  memcpy(w->out + w->at, text, len);
  w->at += len;
  w->out[w->at] = '\0';
}

/* A float sent as jsonb's numeric text → float4out / float8out: the same
 * shortest digits, fixed notation for decimal exponents in -4..limit-1,
 * else d.ddde±XX. "-0" cannot be told from "0" (numeric has no -0). */
static bool float_text(const char *s, int limit, char *out, size_t cap) {
  const char *p = s;
  bool negative = *p == '-';
  if (negative) p++;
  char digits[400];
  size_t n = 0;
  long point = -1; /* digits before the decimal point */
  for (; *p != '\0'; p++) {
    if (*p == '.') {
      if (point >= 0) return false;
      point = (long)n;
      continue;
    }
    if (!is_digit(*p) || n + 1 >= sizeof digits) return false;
    digits[n++] = *p;
  }
  if (n == 0) return false;
  if (point < 0) point = (long)n;
  /* strip leading zeros (each moves the point) and trailing zeros */
  size_t lead = 0;
  while (lead < n && digits[lead] == '0') lead++;
  if (lead == n) return snprintf(out, cap, "%s0", negative ? "-" : "") < (int)cap;
  while (n > lead && digits[n - 1] == '0') n--;
  const char *d = digits + lead;
  size_t len = n - lead;
  long exp = point - (long)lead - 1; /* decimal exponent of the first digit */
  writer w = {out, cap, 0, false};
  if (negative) w_put(&w, "-", 1);
  if (exp >= -4 && exp < limit) {
    if (exp < 0) {
      w_put(&w, "0.", 2);
      for (long i = -1; i > exp; i--) w_put(&w, "0", 1);
      w_put(&w, d, len);
    } else if ((long)len <= exp + 1) {
      w_put(&w, d, len);
      for (long i = (long)len; i <= exp; i++) w_put(&w, "0", 1);
    } else {
      w_put(&w, d, (size_t)exp + 1);
      w_put(&w, ".", 1);
      w_put(&w, d + exp + 1, len - (size_t)exp - 1);
    }
  } else {
    char e[32];
    w_put(&w, d, 1);
    if (len > 1) {
      w_put(&w, ".", 1);
      w_put(&w, d + 1, len - 1);
    }
    int m = snprintf(e, sizeof e, "e%c%02ld", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    w_put(&w, e, (size_t)m);
  }
  return !w.full;
}

/* A JSON string as jsonb prints it (escape_json): the text form of a json
 * or jsonb column that holds a string. */
static bool json_string_text(const char *s, char *out, size_t cap) {
  writer w = {out, cap, 0, false};
  w_put(&w, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
    char esc[8];
    switch (*p) {
      case '\b':
        w_put(&w, "\\b", 2);
        break;
      case '\f':
        w_put(&w, "\\f", 2);
        break;
      case '\n':
        w_put(&w, "\\n", 2);
        break;
      case '\r':
        w_put(&w, "\\r", 2);
        break;
      case '\t':
        w_put(&w, "\\t", 2);
        break;
      case '"':
        w_put(&w, "\\\"", 2);
        break;
      case '\\':
        w_put(&w, "\\\\", 2);
        break;
      default:
        if (*p < 0x20) {
          snprintf(esc, sizeof esc, "\\u%04x", *p);
          w_put(&w, esc, 6);
        } else {
          w_put(&w, (const char *)p, 1);
        }
    }
  }
  w_put(&w, "\"", 1);
  return !w.full;
}

static bool array_space(char ch) {
  return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

/* An element as array_out writes it: quoted when empty, "NULL" in any
 * case, or holding a quote, backslash, brace, the delimiter or a blank. */
static void w_element(writer *w, const char *text, char delim) {
  size_t len = strlen(text);
  bool quote =
      len == 0 ||
      (len == 4 && (text[0] == 'N' || text[0] == 'n') && (text[1] == 'U' || text[1] == 'u') &&
       (text[2] == 'L' || text[2] == 'l') && (text[3] == 'L' || text[3] == 'l'));
  for (size_t i = 0; i < len && !quote; i++)
    if (text[i] == '"' || text[i] == '\\' || text[i] == '{' || text[i] == '}' || text[i] == delim ||
        array_space(text[i]))
      quote = true;
  if (!quote) {
    w_put(w, text, len);
    return;
  }
  w_put(w, "\"", 1);
  for (size_t i = 0; i < len; i++) {
    if (text[i] == '"' || text[i] == '\\') w_put(w, "\\", 1);
    w_put(w, text + i, 1);
  }
  w_put(w, "\"", 1);
}

/* One array level at r->at ('['), written with braces. */
static bool w_array(reader *r, writer *w, const keel__column *col, int depth) {
  if (depth > KEEL__CHANGE_MAX_DEPTH) return false;
  r->at++;
  w_put(w, "{", 1);
  skip_ws(r);
  if (r->s[r->at] == ']') {
    r->at++;
    w_put(w, "}", 1);
    return true;
  }
  for (bool first = true;; first = false) {
    if (!first) w_put(w, &col->delim, 1);
    skip_ws(r);
    char ch = r->s[r->at];
    if (ch == '[' && !col->element_json) {
      if (!w_array(r, w, col, depth + 1)) return false;
    } else {
      value_span v;
      if (!read_value(r, &v)) return false;
      char saved = v.len > 0 ? v.start[v.len] : 0;
      if (v.len > 0) v.start[v.len] = '\0'; /* restored below */
      switch (v.kind) {
        case KEEL__JSON_NULL:
          w_put(w, "NULL", 4);
          break;
        case KEEL__JSON_TRUE:
          w_put(w, col->element_bool ? "t" : "true", col->element_bool ? 1 : 4);
          break;
        case KEEL__JSON_FALSE:
          w_put(w, col->element_bool ? "f" : "false", col->element_bool ? 1 : 5);
          break;
        case KEEL__JSON_STRING:
          if (col->element == KEEL__FORM_TIMESTAMP || col->element == KEEL__FORM_TIMESTAMPTZ) {
            char stamp[128];
            if (timestamp_text(v.start, col->element == KEEL__FORM_TIMESTAMPTZ, stamp,
                               sizeof stamp)) {
              w_element(w, stamp, col->delim);
              break;
            }
          }
          w_element(w, v.start, col->delim);
          break;
        case KEEL__JSON_NUMBER:
          if (col->element == KEEL__FORM_FLOAT4 || col->element == KEEL__FORM_FLOAT8) {
            char number[512];
            if (float_text(v.start, col->element == KEEL__FORM_FLOAT4 ? 6 : 15, number,
                           sizeof number)) {
              w_put(w, number, strlen(number));
              break;
            }
          }
          w_put(w, v.start, strlen(v.start));
          break;
        default: /* nested JSON of json/jsonb elements */
          w_element(w, v.start, col->delim);
          break;
      }
      if (v.len > 0) v.start[v.len] = saved;
    }
    skip_ws(r);
    if (r->s[r->at] == ',') {
      r->at++;
      continue;
    }
    if (r->s[r->at] == ']') {
      r->at++;
      w_put(w, "}", 1);
      return true;
    }
    return false;
  }
}

bool keel__to_text_form(const keel__column *col, const char *json, char *out, size_t cap) {
  if (col == NULL || json == NULL || out == NULL || cap == 0) return false;
  switch (col->form) {
    case KEEL__FORM_TIMESTAMP:
    case KEEL__FORM_TIMESTAMPTZ:
      return timestamp_text(json, col->form == KEEL__FORM_TIMESTAMPTZ, out, cap);
    case KEEL__FORM_FLOAT4:
    case KEEL__FORM_FLOAT8:
      return float_text(json, col->form == KEEL__FORM_FLOAT4 ? 6 : 15, out, cap);
    case KEEL__FORM_JSON:
      return json_string_text(json, out, cap);
    case KEEL__FORM_ARRAY: {
      size_t len = strlen(json);
      char *copy = keel__malloc(len + 1);
      if (copy == NULL) return false;
      memcpy(copy, json, len + 1);
      reader r = {copy, 0, NULL, NULL, false, 0};
      writer w = {out, cap, 0, false};
      skip_ws(&r);
      bool ok = copy[r.at] == '[' && w_array(&r, &w, col, 1);
      if (ok) {
        skip_ws(&r);
        ok = copy[r.at] == '\0' && !w.full;
      }
      keel__free(copy);
      return ok;
    }
    default:
      return false;
  }
}

static const char *remember(keel_change *c, const char *text) {
  size_t len = strlen(text);
  keel__text *t = keel__malloc(sizeof *t + len + 1);
  if (t == NULL) return NULL;
  memcpy(t->text, text, len + 1);
  t->next = c->texts;
  c->texts = t;
  return t->text;
}

/* The text form of a field, made once. NULL when it needs none or when it
 * cannot be made (then the value is given as sent). */
static const char *text_form(keel_change *c, keel__field *f) {
  if (c->columns == NULL || c->columns->as_is || f->value == NULL) return NULL;
  const keel__column *col = keel__columns_find(c->columns, f->name);
  if (col == NULL) return NULL;
  bool wanted;
  switch (col->form) {
    case KEEL__FORM_TIMESTAMP:
    case KEEL__FORM_TIMESTAMPTZ:
    case KEEL__FORM_JSON:
      wanted = f->kind == KEEL__JSON_STRING;
      break;
    case KEEL__FORM_ARRAY:
      wanted = f->kind == KEEL__JSON_ARRAY;
      break;
    case KEEL__FORM_FLOAT4:
    case KEEL__FORM_FLOAT8:
      wanted = f->kind == KEEL__JSON_NUMBER;
      break;
    default:
      wanted = false;
  }
  if (!wanted) return NULL;
  /* arrays: quoting and braces; json strings: escapes up to 6 bytes each;
   * floats: up to ~330 digits */
  size_t cap = strlen(f->value) * 6 + 400;
  char small[256];
  char *buf = cap <= sizeof small ? small : keel__malloc(cap);
  if (buf == NULL) return NULL;
  const char *kept = NULL;
  if (keel__to_text_form(col, f->value, buf, cap)) kept = remember(c, buf);
  if (buf != small) keel__free(buf);
  if (kept != NULL) {
    f->value = kept;             /* the next read finds it converted */
    f->kind = KEEL__JSON_OBJECT; /* any kind text_form leaves alone */
  }
  return kept;
}

/* ---- public accessors ---------------------------------------------------- */

keel_change_op keel_change_operation(const keel_change *c) {
  return c == NULL ? 0 : c->op;
}

const char *keel_change_operation_name(const keel_change *c) {
  if (c == NULL) return NULL;
  return c->op == KEEL_CHANGE_INSERT ? "INSERT" : c->op == KEEL_CHANGE_UPDATE ? "UPDATE" : "DELETE";
}

const char *keel_change_schema(const keel_change *c) {
  return c == NULL ? NULL : c->schema;
}

const char *keel_change_table(const keel_change *c) {
  return c == NULL ? NULL : c->table;
}

const char *keel_change_new(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column(c, &c->new_row, column, NULL);
}

const char *keel_change_old(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column(c, &c->old_row, column, NULL);
}

bool keel_change_has_new(const keel_change *c) {
  return c != NULL && c->new_row.present;
}

bool keel_change_has_old(const keel_change *c) {
  return c != NULL && c->old_row.present;
}

const char *keel_change_key(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column(c, &c->key, column, NULL);
}

const char *keel_change_json(const keel_change *c) {
  return c == NULL ? NULL : c->raw;
}

bool keel_change_was_fetched(const keel_change *c) {
  return c != NULL && c->fetched;
}

int64_t keel_change_time_us(const keel_change *c) {
  return c == NULL ? 0 : c->time_us;
}

keel_change_transition keel_change_filter_transition(const keel_change *c) {
  return c == NULL ? KEEL_CHANGE_INSIDE : c->transition;
}

int64_t keel_change_latency_us(const keel_change *c) {
  return c == NULL ? 0 : c->latency_us;
}
