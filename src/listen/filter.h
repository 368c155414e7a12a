/* PostgREST-style row filters ("team_id=eq.123&status=in.(a,b)"): a parser
 * and an evaluator over a row given as a column lookup, without I/O. */
#ifndef KEEL_LISTEN_FILTER_H
#define KEEL_LISTEN_FILTER_H

#include <stdbool.h>
#include <stddef.h>

typedef enum keel__filter_op {
  KEEL__F_EQ,
  KEEL__F_NEQ,
  KEEL__F_LT,
  KEEL__F_LTE,
  KEEL__F_GT,
  KEEL__F_GTE,
  KEEL__F_IN,
  KEEL__F_IS_NULL,
  KEEL__F_IS_TRUE,
  KEEL__F_IS_FALSE
} keel__filter_op;

typedef struct keel__filter_term {
  char *column;
  keel__filter_op op;
  char **values; /* one, or the list of in.() */
  size_t value_count;
  char *type; /* the column's SQL type (format_type) once checked, else NULL */
} keel__filter_term;

typedef struct keel__filter {
  keel__filter_term *terms;
  size_t count;
} keel__filter;

/* Parses text (NULL or "" = match everything). Returns 0, UV_EINVAL with
 * the reason written into why (why_cap bytes), or UV_ENOMEM. */
int keel__filter_parse(keel__filter *f, const char *text, char *why, size_t why_cap);
void keel__filter_free(keel__filter *f);

/* Returns the text of a column of the row, or NULL for SQL NULL / absent;
 * *present says whether the column exists at all. */
typedef const char *(*keel__filter_lookup)(void *row, const char *column, bool *present);

/* true when every term matches the row. */
bool keel__filter_match(const keel__filter *f, keel__filter_lookup lookup, void *row);

/* Writes f as a SQL boolean expression over the trigger row `row` ("NEW" or
 * "OLD") for a trigger's WHEN clause: values as quoted literals, columns read
 * from to_jsonb(row) as the listener sees them. Never narrower than
 * keel__filter_match (a row the evaluator accepts always passes), exact for
 * text values, is.*, and plain decimal numbers. An empty filter writes "".
 * Returns the length or UV_ENOBUFS. */
int keel__filter_to_sql(const keel__filter *f, const char *row, char *buf, size_t cap);

#endif
