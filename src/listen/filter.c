#include "listen/filter.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "core/alloc.h"

static const struct {
  const char *name;
  keel__filter_op op;
} operators[] = {
    {"eq", KEEL__F_EQ},   {"neq", KEEL__F_NEQ},    {"lt", KEEL__F_LT},
    {"lte", KEEL__F_LTE}, {"gt", KEEL__F_GT},      {"gte", KEEL__F_GTE},
    {"in", KEEL__F_IN},   {"is", KEEL__F_IS_NULL}, {"isdistinct", KEEL__F_ISDISTINCT},
};

static void free_strings(char **values, size_t count) {
  if (values == NULL) return;
  for (size_t i = 0; i < count; i++) keel__free(values[i]);
  keel__free(values);
}

static void term_free(keel__filter_term *t) {
  keel__free(t->column);
  keel__free(t->type);
  free_strings(t->canon, t->value_count);
  free_strings(t->values, t->value_count);
}

void keel__filter_free(keel__filter *f) {
  for (size_t i = 0; i < f->count; i++) term_free(&f->terms[i]);
  keel__free(f->terms);
  f->terms = NULL;
  f->count = 0;
}

static int fail(char *why, size_t cap, const char *fmt, const char *detail) {
  if (why != NULL && cap > 0) snprintf(why, cap, fmt, detail);
  return UV_EINVAL;
}

static int push_value(keel__filter_term *t, const char *text, size_t len) {
  char **values = keel__realloc(t->values, (t->value_count + 1) * sizeof *values);
  if (values == NULL) return UV_ENOMEM;
  t->values = values;
  char *copy = keel__strndup(text, len);
  if (copy == NULL) return UV_ENOMEM;
  t->values[t->value_count++] = copy;
  return 0;
}

/* Parses "(a,b,\"c,d\")" into values; quotes allow commas and parentheses,
 * a backslash escapes the next character inside quotes; "()" is the empty
 * list (matches nothing). */
static int parse_list(keel__filter_term *t, const char *s, size_t len, char *why, size_t cap) {
  if (len < 2 || s[0] != '(' || s[len - 1] != ')')
    return fail(why, cap, "in.%s: a list must look like in.(a,b,c)", "");
  size_t i = 1, end = len - 1;
  char buf[1024];
  if (end == 1) return 0; /* in.() */
  while (i <= end) {
    size_t n = 0;
    if (i < end && s[i] == '"') {
      i++;
      while (i < end && s[i] != '"') {
        if (s[i] == '\\' && i + 1 < end) i++;
        if (n + 1 >= sizeof buf) return fail(why, cap, "in.(): a value is too long%s", "");
        buf[n++] = s[i++];
      }
      if (i >= end) return fail(why, cap, "in.(): unterminated quote%s", "");
      i++; /* closing quote */
      if (i < end && s[i] != ',') return fail(why, cap, "in.(): text after a quoted value%s", "");
    } else {
      if (i == end || s[i] == ',')
        return fail(why, cap, "in.(): an empty value (quote it: \"\")%s", "");
      while (i < end && s[i] != ',') {
        if (s[i] == '"' || s[i] == '(' || s[i] == ')')
          return fail(why, cap, "in.(): unexpected quote or parenthesis%s", "");
        if (n + 1 >= sizeof buf) return fail(why, cap, "in.(): a value is too long%s", "");
        buf[n++] = s[i++];
      }
    }
    int rc = push_value(t, buf, n);
    if (rc != 0) return rc;
    if (i == end) break;
    i++; /* comma */
    if (i == end) return fail(why, cap, "in.(): an empty value after a comma%s", "");
  }
  return 0;
}

static bool word_is(const char *s, size_t len, const char *word) {
  if (strlen(word) != len) return false;
  for (size_t i = 0; i < len; i++)
    if (tolower((unsigned char)s[i]) != word[i]) return false;
  return true;
}

static int parse_term(keel__filter_term *t, const char *s, size_t len, char *why, size_t cap) {
  const char *eq = memchr(s, '=', len);
  if (eq == NULL || eq == s)
    return fail(why, cap, "filter: a term must look like column=op.value%s", "");
  size_t col_len = (size_t)(eq - s);
  const char *rest = eq + 1;
  size_t rest_len = len - col_len - 1;
  if (rest_len >= 4 && memcmp(rest, "not.", 4) == 0) {
    t->negate = true;
    rest += 4;
    rest_len -= 4;
  }
  const char *dot = memchr(rest, '.', rest_len);
  if (dot == NULL) return fail(why, cap, "filter: missing operator, expected op.value%s", "");
  size_t op_len = (size_t)(dot - rest);
  char op_name[16];
  if (op_len == 0 || op_len >= sizeof op_name)
    return fail(why, cap, "filter: unknown operator%s", "");
  memcpy(op_name, rest, op_len);
  op_name[op_len] = '\0';
  bool known = false;
  for (size_t i = 0; i < sizeof operators / sizeof operators[0]; i++) {
    if (strcmp(operators[i].name, op_name) == 0) {
      t->op = operators[i].op;
      known = true;
    }
  }
  if (!known) return fail(why, cap, "filter: unknown operator \"%s\"", op_name);
  t->column = keel__strndup(s, col_len);
  if (t->column == NULL) return UV_ENOMEM;
  const char *value = dot + 1;
  size_t value_len = rest_len - op_len - 1;
  if (t->op == KEEL__F_IS_NULL) {
    /* PostgREST: is.null, is.not_null, is.true, is.false, is.unknown, any case */
    if (word_is(value, value_len, "null")) return 0;
    static const struct {
      const char *word;
      keel__filter_op op;
    } is_values[] = {{"not_null", KEEL__F_IS_NOT_NULL},
                     {"true", KEEL__F_IS_TRUE},
                     {"false", KEEL__F_IS_FALSE},
                     {"unknown", KEEL__F_IS_UNKNOWN}};
    for (size_t i = 0; i < sizeof is_values / sizeof is_values[0]; i++) {
      if (word_is(value, value_len, is_values[i].word)) {
        t->op = is_values[i].op;
        return 0;
      }
    }
    return fail(why, cap,
                "filter: is.%s must be is.null, is.not_null, is.true, is.false or "
                "is.unknown",
                "");
  }
  if (t->op == KEEL__F_IN) return parse_list(t, value, value_len, why, cap);
  return push_value(t, value, value_len);
}

int keel__filter_parse(keel__filter *f, const char *text, char *why, size_t cap) {
  memset(f, 0, sizeof *f);
  if (text == NULL || text[0] == '\0') return 0;
  const char *s = text;
  for (;;) {
    /* A term ends at '&' outside of quotes and parentheses. */
    size_t len = 0;
    bool quoted = false;
    int depth = 0;
    while (s[len] != '\0' && (quoted || depth > 0 || s[len] != '&')) {
      if (s[len] == '"') quoted = !quoted;
      if (!quoted && s[len] == '(') depth++;
      if (!quoted && s[len] == ')') depth--;
      len++;
    }
    if (len == 0) {
      keel__filter_free(f);
      return fail(why, cap, "filter: empty term%s", "");
    }
    keel__filter_term *terms = keel__realloc(f->terms, (f->count + 1) * sizeof *terms);
    if (terms == NULL) {
      keel__filter_free(f);
      return UV_ENOMEM;
    }
    f->terms = terms;
    keel__filter_term *t = &f->terms[f->count++];
    memset(t, 0, sizeof *t);
    int rc = parse_term(t, s, len, why, cap);
    if (rc != 0) {
      keel__filter_free(f);
      return rc;
    }
    if (s[len] == '\0') break;
    s += len + 1;
  }
  return 0;
}

/* ---- types ----------------------------------------------------------------- */

keel__cmp keel__filter_cmp_of(unsigned oid) {
  switch (oid) {
    case 20:   /* int8 */
    case 21:   /* int2 */
    case 23:   /* int4 */
    case 26:   /* oid */
    case 1700: /* numeric */
      return KEEL__CMP_NUMERIC;
    case 700:
      return KEEL__CMP_FLOAT4;
    case 701:
      return KEEL__CMP_FLOAT8;
    case 16:
      return KEEL__CMP_BOOL;
    case 25:   /* text */
    case 1043: /* varchar */
    case 19:   /* name */
      return KEEL__CMP_TEXT;
    case 1042:
      return KEEL__CMP_BPCHAR;
    case 1082:
      return KEEL__CMP_DATE;
    case 1114:
      return KEEL__CMP_TIMESTAMP;
    case 1184:
      return KEEL__CMP_TIMESTAMPTZ;
    case 2950:
      return KEEL__CMP_UUID;
    case 1186:
      return KEEL__CMP_INTERVAL;
    default:
      return KEEL__CMP_CANONICAL;
  }
}

bool keel__filter_op_supported(keel__filter_op op, keel__cmp cmp) {
  bool ordering = op == KEEL__F_LT || op == KEEL__F_LTE || op == KEEL__F_GT || op == KEEL__F_GTE;
  return !(ordering && cmp == KEEL__CMP_CANONICAL);
}

int keel__filter_set_typed(keel__filter_term *t, keel__cmp cmp, const char *const *canon) {
  char **copies = NULL;
  if (t->value_count > 0) {
    copies = keel__calloc(t->value_count, sizeof *copies);
    if (copies == NULL) return UV_ENOMEM;
    for (size_t i = 0; i < t->value_count; i++) {
      copies[i] = keel__strdup(canon[i] != NULL ? canon[i] : t->values[i]);
      if (copies[i] == NULL) {
        free_strings(copies, t->value_count);
        return UV_ENOMEM;
      }
    }
  }
  free_strings(t->canon, t->value_count);
  t->canon = copies;
  t->cmp = cmp;
  return 0;
}

/* ---- comparing --------------------------------------------------------------- */

static bool as_number(const char *text, double *out) {
  if (text == NULL || text[0] == '\0') return false;
  char *end = NULL;
  errno = 0;
  double v = strtod(text, &end);
  if (end == text || *end != '\0' || errno == ERANGE || isnan(v)) return false;
  *out = v;
  return true;
}

/* untyped: numbers when both read as numbers, else bytes */
static int compare_untyped(const char *a, const char *b) {
  double x, y;
  if (as_number(a, &x) && as_number(b, &y)) return (x > y) - (x < y);
  return strcmp(a, b);
}

/* numeric_out text: [-]digits[.digits], NaN, Infinity, -Infinity. Rank:
 * -Infinity < numbers < Infinity < NaN (PostgreSQL's order). */
static int numeric_rank(const char *s) {
  if ((s[0] >= '0' && s[0] <= '9') || (s[0] == '-' && s[1] >= '0' && s[1] <= '9')) return 1;
  if (strcmp(s, "NaN") == 0) return 3;
  if (strcmp(s, "Infinity") == 0) return 2;
  if (strcmp(s, "-Infinity") == 0) return 0;
  return 1;
}

/* Compares two magnitudes given as integer and fraction digit strings. */
static int compare_magnitude(const char *a, const char *b) {
  while (*a == '0') a++;
  while (*b == '0') b++;
  size_t ia = 0, ib = 0;
  while (a[ia] != '\0' && a[ia] != '.') ia++;
  while (b[ib] != '\0' && b[ib] != '.') ib++;
  if (ia != ib) return ia < ib ? -1 : 1;
  int c = strncmp(a, b, ia);
  if (c != 0) return c < 0 ? -1 : 1;
  const char *fa = a[ia] == '.' ? a + ia + 1 : "";
  const char *fb = b[ib] == '.' ? b + ib + 1 : "";
  for (;;) {
    char da = *fa != '\0' ? *fa++ : '0', db = *fb != '\0' ? *fb++ : '0';
    if (da != db) return da < db ? -1 : 1;
    if (*fa == '\0' && *fb == '\0') return 0;
  }
}

static bool is_zero(const char *s) {
  for (; *s != '\0'; s++)
    if (*s != '0' && *s != '.') return false;
  return true;
}

static int compare_numeric(const char *a, const char *b) {
  int ra = numeric_rank(a), rb = numeric_rank(b);
  if (ra != rb || ra != 1) return (ra > rb) - (ra < rb);
  bool na = a[0] == '-', nb = b[0] == '-';
  const char *ma = na ? a + 1 : a, *mb = nb ? b + 1 : b;
  if (na && is_zero(ma)) na = false; /* -0 = 0 */
  if (nb && is_zero(mb)) nb = false;
  if (na != nb) return na ? -1 : 1;
  int c = compare_magnitude(ma, mb);
  return na ? -c : c;
}

static int compare_float(const char *a, const char *b, bool single) {
  double x = single ? (double)strtof(a, NULL) : strtod(a, NULL);
  double y = single ? (double)strtof(b, NULL) : strtod(b, NULL);
  bool nx = isnan(x), ny = isnan(y);
  if (nx || ny) return (int)nx - (int)ny; /* NaN = NaN, NaN > everything */
  return (x > y) - (x < y);
}

static int bool_value(const char *s) {
  return s[0] == 't' || s[0] == 'T' ? 1 : 0; /* "true" / "t" */
}

/* Days from 0000-03-01 style civil date (Howard Hinnant's algorithm). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
  y -= m <= 2;
  int64_t era = (y >= 0 ? y : y - 399) / 400;
  unsigned yoe = (unsigned)(y - era * 400);
  unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
  unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + (int64_t)doe - 719468;
}

static bool digits_at(const char *s, int n, long *out) {
  long v = 0;
  for (int i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return false;
    v = v * 10 + (s[i] - '0');
  }
  *out = v;
  return true;
}

/* Reads an optional ".digits" fraction of a second at *p as microseconds
 * (digits past the sixth are read and dropped, as PostgreSQL never prints
 * them). */
static int64_t read_second_fraction(const char **p) {
  const char *s = *p;
  int64_t micros = 0;
  if (*s == '.') {
    s++;
    for (int64_t scale = 100000; *s >= '0' && *s <= '9'; s++, scale /= 10)
      micros += (*s - '0') * scale;
  }
  *p = s;
  return micros;
}

/* ISO output of date / timestamp / timestamptz → µs since 1970 (UTC for
 * timestamptz). Returns false when the text is not in that form. */
static bool parse_instant(const char *s, int64_t *out) {
  if (strcmp(s, "infinity") == 0) {
    *out = INT64_MAX;
    return true;
  }
  if (strcmp(s, "-infinity") == 0) {
    *out = INT64_MIN;
    return true;
  }
  long year = 0, month, day, hour = 0, minute = 0, second = 0;
  size_t yl = strspn(s, "0123456789");
  if (yl < 4 || yl > 7 || !digits_at(s, (int)yl, &year) || s[yl] != '-') return false;
  const char *p = s + yl + 1;
  if (!digits_at(p, 2, &month) || p[2] != '-' || !digits_at(p + 3, 2, &day)) return false;
  p += 5;
  int64_t micros = 0, offset = 0;
  if (*p == ' ' && p[1] >= '0' && p[1] <= '9') {
    if (!digits_at(p + 1, 2, &hour) || p[3] != ':' || !digits_at(p + 4, 2, &minute) ||
        p[6] != ':' || !digits_at(p + 7, 2, &second))
      return false;
    p += 9;
    micros = read_second_fraction(&p);
    if (*p == '+' || *p == '-') {
      int sign = *p == '-' ? -1 : 1;
      long oh = 0, om = 0, os = 0;
      if (!digits_at(p + 1, 2, &oh)) return false;
      p += 3;
      if (*p == ':' && digits_at(p + 1, 2, &om)) p += 3;
      if (*p == ':' && digits_at(p + 1, 2, &os)) p += 3;
      offset = sign * ((int64_t)oh * 3600 + om * 60 + os);
    }
  }
  if (strcmp(p, " BC") == 0) {
    year = 1 - year;
    p += 3;
  }
  if (*p != '\0') return false;
  int64_t days = days_from_civil(year, (unsigned)month, (unsigned)day);
  *out = ((days * 86400 + hour * 3600 + minute * 60 + second) - offset) * 1000000 + micros;
  return true;
}

/* An interval as PostgreSQL compares it (interval_cmp_value): months count
 * 30 days, days 24 hours. Kept as whole days plus microseconds in [0, 1 day)
 * so no sum overflows 64 bits. */
typedef struct interval_span {
  int64_t days;
  int64_t micros;
} interval_span;

#define MICROS_PER_DAY INT64_C(86400000000)

/* Reads "[+-]digits[.digits]" at *p: the whole part in *whole, the
 * fraction as microseconds (of a second: only seconds carry one). */
static bool read_number(const char **p, int64_t *whole, int64_t *fraction_micros) {
  const char *s = *p;
  int sign = 1;
  if (*s == '+' || *s == '-') sign = *s++ == '-' ? -1 : 1;
  if (*s < '0' || *s > '9') return false;
  int64_t w = 0;
  for (; *s >= '0' && *s <= '9'; s++) {
    if (w > (INT64_MAX - 9) / 10) return false;
    w = w * 10 + (*s - '0');
  }
  int64_t frac = read_second_fraction(&s);
  *whole = sign * w;
  *fraction_micros = sign * frac;
  *p = s;
  return true;
}

static void span_add(interval_span *span, int64_t days, int64_t micros) {
  span->days += days + micros / MICROS_PER_DAY;
  span->micros += micros % MICROS_PER_DAY;
  if (span->micros < 0) {
    span->micros += MICROS_PER_DAY;
    span->days--;
  } else if (span->micros >= MICROS_PER_DAY) {
    span->micros -= MICROS_PER_DAY;
    span->days++;
  }
}

/* Adds n of the named unit (year, mon, day, hour, min, sec, also plural and
 * the ISO letters when iso is set). */
static bool span_add_unit(interval_span *span, const char *unit, size_t len, int64_t n,
                          int64_t fraction_micros) {
  static const struct {
    const char *name;
    int64_t days, micros;
  } units[] = {{"year", 360, 0},     {"mon", 30, 0},
               {"day", 1, 0},        {"hour", 0, INT64_C(3600000000)},
               {"min", 0, 60000000}, {"sec", 0, 1000000}};
  if (len > 0 && unit[len - 1] == 's') len--;
  for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
    if (strlen(units[i].name) != len || memcmp(units[i].name, unit, len) != 0) continue;
    if (units[i].days != 0) {
      if (n > INT64_MAX / 400 || n < -INT64_MAX / 400) return false;
      span_add(span, n * units[i].days, fraction_micros);
    } else {
      if (n > INT64_MAX / units[i].micros || n < -INT64_MAX / units[i].micros) return false;
      span_add(span, 0, n * units[i].micros + fraction_micros);
    }
    return true;
  }
  return false;
}

/* "[+-]H+:MM:SS[.ffffff]" (the postgres style's time part). */
static bool read_clock(const char **p, interval_span *span) {
  const char *s = *p;
  int sign = 1;
  if (*s == '+' || *s == '-') sign = *s++ == '-' ? -1 : 1;
  int64_t hours = 0, minutes, seconds, frac = 0;
  if (*s < '0' || *s > '9') return false;
  for (; *s >= '0' && *s <= '9'; s++) {
    if (hours > INT64_C(2000000000000)) return false;
    hours = hours * 10 + (*s - '0');
  }
  long mm, ss;
  if (*s != ':' || !digits_at(s + 1, 2, &mm) || s[3] != ':' || !digits_at(s + 4, 2, &ss))
    return false;
  minutes = mm;
  seconds = ss;
  s += 6;
  frac = read_second_fraction(&s);
  span_add(span, 0, sign * ((hours * 3600 + minutes * 60 + seconds) * 1000000 + frac));
  *p = s;
  return true;
}

/* ISO 8601 style: P[nY][nM][nD][T[nH][nM][n[.f]S]], each part signed;
 * only seconds carry a fraction in PostgreSQL's output. */
static bool parse_interval_iso(const char *s, interval_span *span) {
  bool time = false;
  s++; /* 'P' */
  while (*s != '\0') {
    if (*s == 'T' && !time) {
      time = true;
      s++;
      continue;
    }
    int64_t n, frac;
    if (!read_number(&s, &n, &frac)) return false;
    const char *unit = NULL;
    if (*s == 'Y' && !time) unit = "year";
    if (*s == 'M') unit = time ? "min" : "mon";
    if (*s == 'D' && !time) unit = "day";
    if (*s == 'H' && time) unit = "hour";
    if (*s == 'S' && time) unit = "sec";
    if (unit == NULL || (frac != 0 && *s != 'S')) return false;
    if (!span_add_unit(span, unit, strlen(unit), n, frac)) return false;
    s++;
  }
  return true;
}

/* PostgreSQL's text output of an interval in the postgres (default),
 * postgres_verbose or iso_8601 IntervalStyle. Returns false for other forms
 * (sql_standard), which then compare as text. */
static bool parse_interval(const char *s, interval_span *out) {
  interval_span span = {0, 0};
  if (s[0] == 'P') {
    if (!parse_interval_iso(s, &span)) return false;
    *out = span;
    return true;
  }
  bool verbose = s[0] == '@';
  if (verbose) s += s[1] == ' ' ? 2 : 1;
  bool ago = false, any = false;
  while (*s != '\0') {
    while (*s == ' ') s++;
    if (*s == '\0') break;
    if (strcmp(s, "ago") == 0) {
      ago = true;
      break;
    }
    const char *colon = strchr(s, ':'), *space = strchr(s, ' ');
    if (colon != NULL && (space == NULL || colon < space)) {
      if (!read_clock(&s, &span)) return false;
    } else {
      int64_t n, frac;
      if (!read_number(&s, &n, &frac)) return false;
      if (*s == '\0' && verbose && n == 0 && frac == 0) {
        any = true;
        break;
      } /* "@ 0" */
      if (*s != ' ') return false;
      s++;
      size_t len = strcspn(s, " ");
      if (frac != 0 && !(len >= 3 && memcmp(s, "sec", 3) == 0)) return false;
      if (!span_add_unit(&span, s, len, n, frac)) return false;
      s += len;
    }
    any = true;
  }
  if (!any) return false;
  if (ago) {
    span.days = -span.days;
    span.micros = -span.micros;
    if (span.micros < 0) {
      span.micros += MICROS_PER_DAY;
      span.days--;
    }
  }
  *out = span;
  return true;
}

static int compare_interval(const char *a, const char *b) {
  interval_span x, y;
  if (!parse_interval(a, &x) || !parse_interval(b, &y)) {
    int c = strcmp(a, b);
    return (c > 0) - (c < 0);
  }
  if (x.days != y.days) return (x.days > y.days) - (x.days < y.days);
  return (x.micros > y.micros) - (x.micros < y.micros);
}

static int compare_bpchar(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  while (la > 0 && a[la - 1] == ' ') la--;
  while (lb > 0 && b[lb - 1] == ' ') lb--;
  int c = memcmp(a, b, la < lb ? la : lb);
  if (c != 0) return c < 0 ? -1 : 1;
  return (la > lb) - (la < lb);
}

/* <0, 0, >0; *ok false when a value cannot be read in the class's form
 * (then the comparison is unknown). */
static int compare_typed(keel__cmp cmp, const char *value, const char *literal, bool *ok) {
  *ok = true;
  int64_t x, y;
  switch (cmp) {
    case KEEL__CMP_NUMERIC:
      return compare_numeric(value, literal);
    case KEEL__CMP_FLOAT4:
      return compare_float(value, literal, true);
    case KEEL__CMP_FLOAT8:
      return compare_float(value, literal, false);
    case KEEL__CMP_BOOL:
      return bool_value(value) - bool_value(literal);
    case KEEL__CMP_BPCHAR:
      return compare_bpchar(value, literal);
    case KEEL__CMP_INTERVAL:
      return compare_interval(value, literal);
    case KEEL__CMP_DATE:
    case KEEL__CMP_TIMESTAMP:
    case KEEL__CMP_TIMESTAMPTZ:
      if (!parse_instant(value, &x) || !parse_instant(literal, &y)) {
        *ok = false;
        return 0;
      }
      return (x > y) - (x < y);
    case KEEL__CMP_TEXT:
    case KEEL__CMP_UUID:
    case KEEL__CMP_CANONICAL: {
      int c = strcmp(value, literal);
      return (c > 0) - (c < 0);
    }
    default:
      return compare_untyped(value, literal);
  }
}

typedef enum tri { T_FALSE, T_TRUE, T_UNKNOWN } tri;

static tri tri_of(bool b) {
  return b ? T_TRUE : T_FALSE;
}

static tri term_eval(const keel__filter_term *t, keel__filter_lookup lookup, void *row) {
  bool present = false;
  const char *value = lookup(row, t->column, &present);
  switch (t->op) {
    case KEEL__F_IS_NULL:
      return tri_of(value == NULL);
    case KEEL__F_IS_NOT_NULL:
      return tri_of(value != NULL);
    case KEEL__F_IS_TRUE:
      return tri_of(value != NULL && bool_value(value) == 1);
    case KEEL__F_IS_FALSE:
      return tri_of(value != NULL && bool_value(value) == 0);
    case KEEL__F_IS_UNKNOWN:
      return tri_of(value == NULL);
    default:
      break;
  }
  const char *const *lits = (const char *const *)(t->canon != NULL ? t->canon : t->values);
  if (t->op == KEEL__F_IN) {
    if (t->value_count == 0) return T_FALSE; /* x = ANY('{}') is false, even for NULL */
    if (value == NULL) return T_UNKNOWN;
    bool unknown = false;
    for (size_t i = 0; i < t->value_count; i++) {
      bool ok;
      int c = compare_typed(t->cmp, value, lits[i], &ok);
      if (ok && c == 0) return T_TRUE;
      if (!ok) unknown = true;
    }
    return unknown ? T_UNKNOWN : T_FALSE;
  }
  if (value == NULL) return t->op == KEEL__F_ISDISTINCT ? T_TRUE : T_UNKNOWN;
  bool ok;
  int c = compare_typed(t->cmp, value, lits[0], &ok);
  if (!ok) return T_UNKNOWN;
  switch (t->op) {
    case KEEL__F_EQ:
      return tri_of(c == 0);
    case KEEL__F_NEQ:
    case KEEL__F_ISDISTINCT:
      return tri_of(c != 0);
    case KEEL__F_LT:
      return tri_of(c < 0);
    case KEEL__F_LTE:
      return tri_of(c <= 0);
    case KEEL__F_GT:
      return tri_of(c > 0);
    case KEEL__F_GTE:
      return tri_of(c >= 0);
    default:
      return T_FALSE;
  }
}

bool keel__filter_match(const keel__filter *f, keel__filter_lookup lookup, void *row) {
  for (size_t i = 0; i < f->count; i++) {
    const keel__filter_term *t = &f->terms[i];
    tri r = term_eval(t, lookup, row);
    if (t->negate && r != T_UNKNOWN) r = r == T_TRUE ? T_FALSE : T_TRUE;
    if (r != T_TRUE) return false;
  }
  return true;
}

/* ---- translation into a trigger's WHEN condition ------------------------ */

typedef struct sqlbuf {
  char *buf;
  size_t cap, at;
  bool full;
} sqlbuf;

static void put_n(sqlbuf *b, const char *text, size_t len) {
  if (b->full || b->at + len + 1 > b->cap) {
    b->full = true;
    return;
  }
  memcpy(b->buf + b->at, text, len);
  b->at += len;
  b->buf[b->at] = '\0';
}

static void put(sqlbuf *b, const char *text) {
  put_n(b, text, strlen(text));
}

/* A SQL string literal that reads the same whatever
 * standard_conforming_strings says: an escape string E'...' with both '\'
 * and '\'' escaped. */
static void put_literal(sqlbuf *b, const char *text) {
  put(b, "E'");
  for (const char *p = text; *p != '\0'; p++) {
    if (*p == '\'' || *p == '\\') put_n(b, p, 1);
    put_n(b, p, 1);
  }
  put(b, "'");
}

/* row."column" (a quoted identifier). */
static void put_column(sqlbuf *b, const char *row, const char *column) {
  put(b, row);
  put(b, ".\"");
  for (const char *p = column; *p != '\0'; p++) {
    if (*p == '"') put_n(b, p, 1);
    put_n(b, p, 1);
  }
  put(b, "\"");
}

static const char *sql_operator(keel__filter_op op) {
  switch (op) {
    case KEEL__F_NEQ:
      return " <> ";
    case KEEL__F_LT:
      return " < ";
    case KEEL__F_LTE:
      return " <= ";
    case KEEL__F_GT:
      return " > ";
    case KEEL__F_GTE:
      return " >= ";
    default:
      return " = ";
  }
}

/* An ordering: the column's own type decides (the literal is read as that
 * type), except that text-like columns compare bytewise as the evaluator
 * does (char(n) without its trailing blanks). */
static void put_ordering(sqlbuf *b, const char *row, const keel__filter_term *t) {
  const char *op = sql_operator(t->op);
  put(b, "(CASE WHEN pg_typeof(");
  put_column(b, row, t->column);
  put(b, ") = 'character'::regtype THEN rtrim(");
  put_column(b, row, t->column);
  put(b, "::text, ' ') COLLATE \"C\"");
  put(b, op);
  put(b, "rtrim(");
  put_literal(b, t->values[0]);
  put(b, ", ' ') WHEN pg_typeof(");
  put_column(b, row, t->column);
  put(b, ") IN ('text'::regtype, 'character varying'::regtype, 'name'::regtype) THEN ");
  put_column(b, row, t->column);
  put(b, "::text COLLATE \"C\"");
  put(b, op);
  put_literal(b, t->values[0]);
  put(b, " ELSE ");
  put_column(b, row, t->column);
  put(b, op);
  put_literal(b, t->values[0]);
  put(b, " END)");
}

int keel__filter_to_sql(const keel__filter *f, const char *row, char *buf, size_t cap) {
  sqlbuf b = {buf, cap, 0, false};
  if (buf == NULL || cap == 0) return UV_ENOBUFS;
  buf[0] = '\0';
  for (size_t i = 0; i < f->count; i++) {
    const keel__filter_term *t = &f->terms[i];
    if (i > 0) put(&b, " AND ");
    put(&b, t->negate ? "(NOT (" : "((");
    switch (t->op) {
      case KEEL__F_IS_NULL:
      case KEEL__F_IS_NOT_NULL:
      case KEEL__F_IS_TRUE:
      case KEEL__F_IS_FALSE:
      case KEEL__F_IS_UNKNOWN:
        put_column(&b, row, t->column);
        put(&b, t->op == KEEL__F_IS_NULL       ? " IS NULL"
                : t->op == KEEL__F_IS_NOT_NULL ? " IS NOT NULL"
                : t->op == KEEL__F_IS_TRUE     ? " IS TRUE"
                : t->op == KEEL__F_IS_FALSE    ? " IS FALSE"
                                               : " IS UNKNOWN");
        break;
      case KEEL__F_IN:
        if (t->value_count == 0) {
          put(&b, "FALSE");
          break;
        }
        put_column(&b, row, t->column);
        put(&b, " IN (");
        for (size_t v = 0; v < t->value_count; v++) {
          if (v > 0) put(&b, ", ");
          put_literal(&b, t->values[v]);
        }
        put(&b, ")");
        break;
      case KEEL__F_ISDISTINCT:
        put_column(&b, row, t->column);
        put(&b, " IS DISTINCT FROM ");
        put_literal(&b, t->values[0]);
        break;
      case KEEL__F_EQ:
      case KEEL__F_NEQ:
        put_column(&b, row, t->column);
        put(&b, sql_operator(t->op));
        put_literal(&b, t->values[0]);
        break;
      default:
        put_ordering(&b, row, t);
        break;
    }
    put(&b, "))");
  }
  return b.full ? UV_ENOBUFS : (int)b.at;
}
