/* Read access to query results and quoting of identifiers. */
#include <stdlib.h>
#include <string.h>

#include "pg/pg_internal.h"

static bool in_range(const keel_pg_result *r, int row, int col) {
  return r != NULL && r->res != NULL && row >= 0 && col >= 0 && row < PQntuples(r->res) &&
         col < PQnfields(r->res);
}

int keel_pg_result_nrows(const keel_pg_result *r) {
  return r == NULL || r->res == NULL ? 0 : PQntuples(r->res);
}

int keel_pg_result_ncols(const keel_pg_result *r) {
  return r == NULL || r->res == NULL ? 0 : PQnfields(r->res);
}

int keel_pg_result_col(const keel_pg_result *r, const char *name) {
  if (r == NULL || r->res == NULL || name == NULL) return -1;
  /* PQfnumber folds unquoted names to lower case; compare exactly instead. */
  int n = PQnfields(r->res);
  for (int i = 0; i < n; i++)
    if (strcmp(PQfname(r->res, i), name) == 0) return i;
  return -1;
}

const char *keel_pg_result_col_name(const keel_pg_result *r, int col) {
  if (r == NULL || r->res == NULL || col < 0 || col >= PQnfields(r->res)) return NULL;
  return PQfname(r->res, col);
}

const char *keel_pg_result_value(const keel_pg_result *r, int row, int col) {
  if (!in_range(r, row, col) || PQgetisnull(r->res, row, col)) return NULL;
  return PQgetvalue(r->res, row, col);
}

const char *keel_pg_result_get(const keel_pg_result *r, int row, const char *name) {
  return keel_pg_result_value(r, row, keel_pg_result_col(r, name));
}

int keel_pg_result_length(const keel_pg_result *r, int row, int col) {
  if (!in_range(r, row, col) || PQgetisnull(r->res, row, col)) return 0;
  return PQgetlength(r->res, row, col);
}

bool keel_pg_result_is_null(const keel_pg_result *r, int row, int col) {
  return !in_range(r, row, col) || PQgetisnull(r->res, row, col);
}

uint64_t keel_pg_result_affected(const keel_pg_result *r) {
  if (r == NULL || r->res == NULL) return 0;
  const char *tuples = PQcmdTuples(r->res);
  if (tuples == NULL || tuples[0] == '\0') return 0;
  char *end = NULL;
  unsigned long long n = strtoull(tuples, &end, 10);
  return end != tuples ? (uint64_t)n : 0;
}

const char *keel_pg_result_sqlstate(const keel_pg_result *r) {
  if (r == NULL || r->res == NULL) return NULL;
  return PQresultErrorField(r->res, PG_DIAG_SQLSTATE);
}

const char *keel_pg_result_error(const keel_pg_result *r) {
  if (r == NULL) return NULL;
  if (r->res != NULL) {
    const char *primary = PQresultErrorField(r->res, PG_DIAG_MESSAGE_PRIMARY);
    if (primary != NULL) return primary;
  }
  return r->error_text;
}

void *keel_pg_result_raw(const keel_pg_result *r) {
  return r == NULL ? NULL : r->res;
}

/* Writes one quoted part; returns bytes written or -1 when out of room. */
static int quote_part(char *buf, size_t cap, size_t at, const char *part, size_t len) {
  size_t need = 2 + len;
  for (size_t i = 0; i < len; i++)
    if (part[i] == '"') need++;
  if (at + need + 1 > cap) return -1;
  char *out = buf + at;
  *out++ = '"';
  for (size_t i = 0; i < len; i++) {
    if (part[i] == '"') *out++ = '"';
    *out++ = part[i];
  }
  *out++ = '"';
  *out = '\0';
  return (int)need;
}

int keel_pg_quote_ident(char *buf, size_t cap, const char *ident, bool allow_qualified) {
  if (buf == NULL || ident == NULL || ident[0] == '\0') return UV_EINVAL;
  const char *dot = strchr(ident, '.');
  size_t total = strlen(ident);
  if (dot != NULL && (!allow_qualified || strchr(dot + 1, '.') != NULL)) return UV_EINVAL;
  size_t first_len = dot != NULL ? (size_t)(dot - ident) : total;
  size_t second_len = dot != NULL ? total - first_len - 1 : 0;
  if (first_len == 0 || first_len > 63) return UV_EINVAL;
  if (dot != NULL && (second_len == 0 || second_len > 63)) return UV_EINVAL;
  int written = quote_part(buf, cap, 0, ident, first_len);
  if (written < 0) return UV_ENOBUFS;
  if (dot == NULL) return written;
  if ((size_t)written + 2 > cap) return UV_ENOBUFS;
  buf[written] = '.';
  int second = quote_part(buf, cap, (size_t)written + 1, dot + 1, second_len);
  if (second < 0) return UV_ENOBUFS;
  return written + 1 + second;
}
