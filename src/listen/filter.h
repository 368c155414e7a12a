/* PostgREST-style row filters ("team_id=eq.123&status=in.(a,b)"): a parser,
 * an evaluator over a row given as a column lookup, and the translation
 * into a trigger's WHEN condition, without I/O.
 *
 * The evaluator compares the way PostgreSQL does once the listener has told
 * each term its column's type class and the literal's canonical text (the
 * server's output of the literal cast to the column's type):
 * keel__filter_set_typed(). Until then (and in tests without a server) it
 * compares untyped: as numbers when both sides read as numbers, else as
 * bytes. */
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
  KEEL__F_ISDISTINCT,
  KEEL__F_IS_NULL,
  KEEL__F_IS_NOT_NULL,
  KEEL__F_IS_TRUE,
  KEEL__F_IS_FALSE,
  KEEL__F_IS_UNKNOWN
} keel__filter_op;

/* How a column's values compare (from its type). */
typedef enum keel__cmp {
  KEEL__CMP_UNTYPED = 0, /* no catalog information */
  KEEL__CMP_NUMERIC,     /* integers and numeric: exact decimal, NaN greatest */
  KEEL__CMP_FLOAT4,
  KEEL__CMP_FLOAT8, /* as the C float/double, NaN equal to itself and greatest */
  KEEL__CMP_BOOL,
  KEEL__CMP_TEXT,   /* text, varchar, name: bytewise (COLLATE "C") */
  KEEL__CMP_BPCHAR, /* char(n): bytewise, trailing blanks ignored */
  KEEL__CMP_DATE,
  KEEL__CMP_TIMESTAMP,
  KEEL__CMP_TIMESTAMPTZ, /* as instants */
  KEEL__CMP_UUID,        /* canonical lower-case text, ordered bytewise */
  KEEL__CMP_INTERVAL,    /* as PostgreSQL orders intervals: a month is 30 days,
                            a day 24 hours ('1 day' = '24:00:00') */
  KEEL__CMP_CANONICAL    /* other types (uuid, inet, jsonb, enums, ...): equality
                            of the canonical text; no ordering */
} keel__cmp;

typedef struct keel__filter_term {
  char *column;
  keel__filter_op op;
  bool negate;   /* not. prefix */
  char **values; /* one, or the list of in.() (may be empty) */
  size_t value_count;
  char *type;    /* the column's SQL type (format_type) once checked, else NULL */
  keel__cmp cmp; /* set with the canonical values */
  char **canon;  /* per value: the server's text of value::type, or NULL */
} keel__filter_term;

typedef struct keel__filter {
  keel__filter_term *terms;
  size_t count;
} keel__filter;

/* Parses text (NULL or "" = match everything). Returns 0, UV_EINVAL with
 * the reason written into why (why_cap bytes), or UV_ENOMEM. */
int keel__filter_parse(keel__filter *f, const char *text, char *why, size_t why_cap);
void keel__filter_free(keel__filter *f);

/* The comparison class of a type (its base type's oid). */
keel__cmp keel__filter_cmp_of(unsigned type_oid);

/* Whether the operator is supported for the class (ordering needs an order
 * keel knows). */
bool keel__filter_op_supported(keel__filter_op op, keel__cmp cmp);

/* Makes term t typed: class cmp, and canon[i] the canonical text of
 * values[i] (copied). Returns 0 or UV_ENOMEM (t unchanged). */
int keel__filter_set_typed(keel__filter_term *t, keel__cmp cmp, const char *const *canon);

/* Returns the text of a column of the row, or NULL for SQL NULL / absent;
 * *present says whether the column exists at all. */
typedef const char *(*keel__filter_lookup)(void *row, const char *column, bool *present);

/* true when every term is true for the row (SQL: NULL is not true). */
bool keel__filter_match(const keel__filter *f, keel__filter_lookup lookup, void *row);

/* Writes f as a SQL boolean expression over the trigger row `row` ("NEW" or
 * "OLD") for a trigger's WHEN clause: row."column" compared with escape
 * string literals that PostgreSQL reads as the column's type, so the
 * server's own semantics decide; text-like columns order bytewise
 * (COLLATE "C") like the evaluator. An empty filter writes "".
 * Returns the length or UV_ENOBUFS. */
int keel__filter_to_sql(const keel__filter *f, const char *row, char *buf, size_t cap);

#endif
