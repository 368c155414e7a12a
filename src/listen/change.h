/* keel's change payload: a JSON reader made for it, without I/O. It parses
 * the trigger's JSON once per notification, in place in a writable copy of
 * the payload, and keeps every value's text as it was sent: numbers are
 * never converted (numeric 19.90 stays "19.90", 30-digit numerics stay
 * whole), strings are unescaped, nested objects and arrays (json, jsonb
 * and array columns) are kept as their JSON text. No allocation per
 * change for rows of up to KEEL__CHANGE_INLINE_FIELDS columns. */
#ifndef KEEL_LISTEN_CHANGE_H
#define KEEL_LISTEN_CHANGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/listen.h"

/* The latest change time accepted in a payload: 9999-12-31T23:59:59Z in µs
 * since the epoch. Earlier than the epoch is refused too. */
#define KEEL__CHANGE_MAX_TIME_US INT64_C(253402300799999999)

/* Nesting accepted inside a column value (json columns). */
#define KEEL__CHANGE_MAX_DEPTH 64

#define KEEL__CHANGE_INLINE_FIELDS 48

typedef enum keel__json_kind {
  KEEL__JSON_NULL,
  KEEL__JSON_STRING,
  KEEL__JSON_NUMBER,
  KEEL__JSON_TRUE,
  KEEL__JSON_FALSE,
  KEEL__JSON_OBJECT,
  KEEL__JSON_ARRAY
} keel__json_kind;

/* How a column's JSON form (to_jsonb) becomes its text form (col::text). */
typedef enum keel__form {
  KEEL__FORM_AS_IS = 0,   /* numbers, strings, booleans, jsonb, ...: the same */
  KEEL__FORM_TIMESTAMP,   /* "2024-01-01T10:00:00+05:30" → "2024-01-01 10:00:00+05:30" */
  KEEL__FORM_TIMESTAMPTZ, /* also "+00:00" → "+00" */
  KEEL__FORM_ARRAY,       /* [1, 2] → {1,2}, with array_out's quoting */
  KEEL__FORM_FLOAT4,      /* jsonb keeps floats as numeric: 0.00001 → 1e-05 */
  KEEL__FORM_FLOAT8,
  KEEL__FORM_JSON /* json/jsonb: a JSON string keeps its quotes */
} keel__form;

/* A column of a table, from the catalog. */
typedef struct keel__column {
  char *name;
  char *type;        /* format_type(), e.g. "numeric(10,2)" */
  unsigned type_oid; /* the base type's oid (domains resolved) */
  keel__form form;
  keel__form element; /* arrays: how elements convert (AS_IS, timestamp, float) */
  bool element_bool;  /* arrays of boolean: t / f */
  bool element_json;  /* arrays of json/jsonb: nested JSON is an element */
  char delim;         /* arrays: the element type's delimiter */
} keel__column;

typedef struct keel__columns {
  keel__column *items;
  size_t count;
  bool as_is; /* every column's form is AS_IS: no text form to make (set by whoever fills items) */
} keel__columns;

void keel__columns_free(keel__columns *cols);
const keel__column *keel__columns_find(const keel__columns *cols, const char *name);

/* Writes the text form of a value sent in JSON form (a timestamp's string
 * or an array's JSON text) into out (at least strlen(json) * 2 + 3 bytes for
 * arrays, strlen + 1 for timestamps). Returns false when the value does not
 * have the expected shape (then it is delivered as sent). */
bool keel__to_text_form(const keel__column *col, const char *json, char *out, size_t cap);

typedef struct keel__text {
  struct keel__text *next;
  char text[];
} keel__text;

/* One member of a row object: its name and its value's text (NUL-terminated,
 * NULL for JSON null). */
typedef struct keel__field {
  const char *name;
  const char *value;
  keel__json_kind kind;
} keel__field;

/* A row: a range of the change's fields. */
typedef struct keel__row {
  uint32_t first;
  uint32_t count;
  bool present;
} keel__row;

struct keel_change {
  keel_change_op op;
  const char *schema;
  const char *table;
  const char *raw; /* the payload as received */
  int64_t time_us;
  int64_t latency_us;
  bool key_only;
  bool fetched;
  int64_t overflow_id;               /* > 0: the change waits in keel_overflow under this id */
  keel_change_transition transition; /* set at delivery */
  keel__row new_row;                 /* present false when absent or null */
  keel__row old_row;
  keel__row key;
  keel__field *fields; /* inline_fields, or allocated when more are needed */
  uint32_t field_count;
  uint32_t field_cap;
  char *owned_work;  /* the working copy when keel__change_parse made it */
  char *owned_raw;   /* raw's own copy once it stopped borrowing (keel__change_own_raw) */
  char *fetched_row; /* a fetched row's text (parsed in place), owned */
  const keel__columns *columns; /* the table's columns while delivered, or NULL */
  keel__text *texts;            /* text forms made on demand, freed with the change */
  keel__field inline_fields[KEEL__CHANGE_INLINE_FIELDS];
};

/* Parses payload (copied into a working buffer owned by c; payload must
 * outlive c, keel_change_json returns it). Returns 0, KEEL_EPROTO with the
 * reason in why, or UV_ENOMEM. keel__change_free is needed in every case. */
int keel__change_parse(keel_change *c, const char *payload, char *why, size_t why_cap);

/* Like keel__change_parse, parsing in `work`, a writable copy of payload
 * that the caller keeps alive as long as c (no copy is made). */
int keel__change_parse_in(keel_change *c, const char *payload, char *work, char *why,
                          size_t why_cap);

/* Replaces the new row (the old row for a DELETE) by a row fetched by key:
 * `row` is a JSON object's text, taken over by c (freed with it, also on
 * failure). Returns 0, KEEL_EPROTO (not a JSON object; nothing changed) or
 * UV_ENOMEM. */
int keel__change_set_fetched(keel_change *c, char *row);

/* Replaces c by the full change read from the overflow table: `payload`
 * (allocated, taken over by c, freed with it also on failure). Returns 0,
 * KEEL_EPROTO or UV_ENOMEM; c stays valid (freeable) in every case. */
int keel__change_set_overflow(keel_change *c, char *payload, char *why, size_t why_cap);

/* Like keel__change_set_overflow without copying: `work` (a writable copy of
 * `raw`, taken over: freed with c, also on failure) is parsed in place, and
 * `raw` (the text keel_change_json gives) is borrowed: it must outlive c's
 * use, or be copied first by keel__change_own_raw. */
int keel__change_set_overflow_in(keel_change *c, const char *raw, char *work, char *why,
                                 size_t why_cap);

/* Gives c its own copy of its raw text (borrowed until now). Returns 0 or
 * UV_ENOMEM (nothing changed). */
int keel__change_own_raw(keel_change *c);

void keel__change_free(keel_change *c);

/* A column of a row: its text (NULL for SQL NULL / absent); *present tells
 * whether the column exists at all. With c->columns set, timestamps and
 * arrays are given in their text form (made once, cached in c). */
const char *keel__change_column(const keel_change *c, const keel__row *row, const char *column,
                                bool *present);

#endif
