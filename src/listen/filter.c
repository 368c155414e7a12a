#include "listen/filter.h"

#include <errno.h>
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
    {"eq", KEEL__F_EQ}, {"neq", KEEL__F_NEQ}, {"lt", KEEL__F_LT}, {"lte", KEEL__F_LTE},
    {"gt", KEEL__F_GT}, {"gte", KEEL__F_GTE}, {"in", KEEL__F_IN}, {"is", KEEL__F_IS_NULL},
};

static void term_free(keel__filter_term *t) {
  keel__free(t->column);
  keel__free(t->type);
  for (size_t i = 0; i < t->value_count; i++) keel__free(t->values[i]);
  keel__free(t->values);
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
 * a backslash escapes the next character inside quotes. */
static int parse_list(keel__filter_term *t, const char *s, size_t len, char *why, size_t cap) {
  if (len < 2 || s[0] != '(' || s[len - 1] != ')')
    return fail(why, cap, "in.%s: a list must look like in.(a,b,c)", "");
  size_t i = 1, end = len - 1;
  char buf[1024];
  if (end == 1) return fail(why, cap, "in.(): the list is empty%s", "");
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

static int parse_term(keel__filter_term *t, const char *s, size_t len, char *why, size_t cap) {
  const char *eq = memchr(s, '=', len);
  if (eq == NULL || eq == s)
    return fail(why, cap, "filter: a term must look like column=op.value%s", "");
  size_t col_len = (size_t)(eq - s);
  const char *rest = eq + 1;
  size_t rest_len = len - col_len - 1;
  const char *dot = memchr(rest, '.', rest_len);
  if (dot == NULL) return fail(why, cap, "filter: missing operator, expected op.value%s", "");
  size_t op_len = (size_t)(dot - rest);
  char op_name[8];
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
    if (value_len == 4 && memcmp(value, "null", 4) == 0) return 0;
    if (value_len == 4 && memcmp(value, "true", 4) == 0) {
      t->op = KEEL__F_IS_TRUE;
      return 0;
    }
    if (value_len == 5 && memcmp(value, "false", 5) == 0) {
      t->op = KEEL__F_IS_FALSE;
      return 0;
    }
    return fail(why, cap, "filter: is.%s must be is.null, is.true or is.false", "");
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

static bool as_number(const char *text, double *out) {
  if (text == NULL || text[0] == '\0') return false;
  char *end = NULL;
  errno = 0;
  double v = strtod(text, &end);
  if (end == text || *end != '\0' || errno == ERANGE || isnan(v)) return false;
  *out = v;
  return true;
}

/* <0, 0, >0 like strcmp; numbers compare as numbers when both are numbers. */
static int compare(const char *a, const char *b) {
  double x, y;
  if (as_number(a, &x) && as_number(b, &y)) return (x > y) - (x < y);
  return strcmp(a, b);
}

static bool term_match(const keel__filter_term *t, keel__filter_lookup lookup, void *row) {
  bool present = false;
  const char *value = lookup(row, t->column, &present);
  switch (t->op) {
    case KEEL__F_IS_NULL:
      return value == NULL;
    case KEEL__F_IS_TRUE:
      return value != NULL && strcmp(value, "true") == 0;
    case KEEL__F_IS_FALSE:
      return value != NULL && strcmp(value, "false") == 0;
    default:
      break;
  }
  if (value == NULL) return false; /* SQL: comparisons with NULL are not true */
  switch (t->op) {
    case KEEL__F_EQ:
      return compare(value, t->values[0]) == 0;
    case KEEL__F_NEQ:
      return compare(value, t->values[0]) != 0;
    case KEEL__F_LT:
      return compare(value, t->values[0]) < 0;
    case KEEL__F_LTE:
      return compare(value, t->values[0]) <= 0;
    case KEEL__F_GT:
      return compare(value, t->values[0]) > 0;
    case KEEL__F_GTE:
      return compare(value, t->values[0]) >= 0;
    case KEEL__F_IN:
      for (size_t i = 0; i < t->value_count; i++)
        if (compare(value, t->values[i]) == 0) return true;
      return false;
    default:
      return false;
  }
}

bool keel__filter_match(const keel__filter *f, keel__filter_lookup lookup, void *row) {
  for (size_t i = 0; i < f->count; i++)
    if (!term_match(&f->terms[i], lookup, row)) return false;
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

/* The column's text exactly as the evaluator sees it in keel's JSON. */
static void put_column(sqlbuf *b, const char *row, const char *column) {
  put(b, "(to_jsonb(");
  put(b, row);
  put(b, ") ->> ");
  put_literal(b, column);
  put(b, ")");
}

/* A plain decimal number that strtod and PostgreSQL's float8 input read the
 * same way and that cannot overflow: the shape the trigger's regex accepts. */
#define PLAIN_NUMBER_RE "'^[-+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]{1,2})?$'"

/* Text strtod might read as a number in another form (hex, inf, very long):
 * the trigger lets it through and the listener decides. */
#define MAYBE_NUMBER_RE "'^[[:space:]]*[-+]?([0-9.]|[iInN])'"

static bool plain_number(const char *s) {
  size_t n = strlen(s), i = 0, digits = 0;
  if (n == 0 || n >= 40) return false;
  if (s[i] == '+' || s[i] == '-') i++;
  while (i < n && s[i] >= '0' && s[i] <= '9') i++, digits++;
  if (i < n && s[i] == '.') i++;
  while (i < n && s[i] >= '0' && s[i] <= '9') i++, digits++;
  if (digits == 0) return false;
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    size_t e = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++, e++;
    if (e == 0 || e > 2) return false;
  }
  return i == n;
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

/* One comparison of the column with one value, never narrower than the
 * evaluator: text compares bytewise (COLLATE "C" = strcmp); a plain decimal
 * value compares as float8 when the column's text is a plain decimal too,
 * as text when the column's text cannot be a number, and otherwise lets the
 * row through for the listener to decide. */
static void put_compare(sqlbuf *b, const char *row, const char *column, keel__filter_op op,
                        const char *value) {
  double ignored;
  if (!as_number(value, &ignored)) {
    put(b, "(");
    put_column(b, row, column);
    put(b, " COLLATE \"C\"");
    put(b, sql_operator(op));
    put_literal(b, value);
    put(b, ")");
    return;
  }
  if (!plain_number(value)) { /* hex, inf, ...: the listener decides */
    put(b, "(");
    put_column(b, row, column);
    put(b, " IS NOT NULL)");
    return;
  }
  put(b, "(CASE WHEN ");
  put_column(b, row, column);
  put(b, " ~ " PLAIN_NUMBER_RE " AND length(");
  put_column(b, row, column);
  put(b, ") < 40 THEN ");
  put_column(b, row, column);
  put(b, "::float8");
  put(b, sql_operator(op));
  put_literal(b, value);
  put(b, "::float8 ELSE ");
  put_column(b, row, column);
  put(b, " ~ " MAYBE_NUMBER_RE " OR ");
  put_column(b, row, column);
  put(b, " COLLATE \"C\"");
  put(b, sql_operator(op));
  put_literal(b, value);
  put(b, " END)");
}

int keel__filter_to_sql(const keel__filter *f, const char *row, char *buf, size_t cap) {
  sqlbuf b = {buf, cap, 0, false};
  if (buf == NULL || cap == 0) return UV_ENOBUFS;
  buf[0] = '\0';
  for (size_t i = 0; i < f->count; i++) {
    const keel__filter_term *t = &f->terms[i];
    if (i > 0) put(&b, " AND ");
    switch (t->op) {
      case KEEL__F_IS_NULL:
        put(&b, "(");
        put_column(&b, row, t->column);
        put(&b, " IS NULL)");
        break;
      case KEEL__F_IS_TRUE:
      case KEEL__F_IS_FALSE:
        put(&b, "(");
        put_column(&b, row, t->column);
        put(&b, t->op == KEEL__F_IS_TRUE ? " = 'true')" : " = 'false')");
        break;
      case KEEL__F_IN:
        put(&b, "(");
        for (size_t v = 0; v < t->value_count; v++) {
          if (v > 0) put(&b, " OR ");
          put_compare(&b, row, t->column, KEEL__F_EQ, t->values[v]);
        }
        put(&b, ")");
        break;
      default:
        put_compare(&b, row, t->column, t->op, t->values[0]);
        break;
    }
  }
  return b.full ? UV_ENOBUFS : (int)b.at;
}
