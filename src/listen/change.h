/* keel's change payload: parsing the trigger's JSON once per notification
 * and reading columns as text. No I/O. */
#ifndef KEEL_LISTEN_CHANGE_H
#define KEEL_LISTEN_CHANGE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "keel/listen.h"

typedef struct keel__text {
  struct keel__text *next;
  char text[];
} keel__text;

struct keel_change {
  json_t *root;
  json_t *new_row; /* NULL when absent */
  json_t *old_row;
  json_t *key;
  keel_change_op op;
  const char *schema;
  const char *table;
  const char *raw;
  int64_t time_us;
  int64_t latency_us;
  bool key_only;
  bool fetched;
  keel__text *texts; /* column texts formatted on demand, freed with the change */
};

/* The latest change time accepted in a payload: 9999-12-31T23:59:59Z in µs
 * since the epoch. Earlier than the epoch is refused too. */
#define KEEL__CHANGE_MAX_TIME_US INT64_C(253402300799999999)

/* Parses payload into c (which keeps references into the parsed tree; raw
 * must outlive c). Returns 0, KEEL_EPROTO with the reason in why, or
 * UV_ENOMEM. */
int keel__change_parse(keel_change *c, const char *payload, char *why, size_t why_cap);
void keel__change_free(keel_change *c);
/* Text of a JSON value as the handlers see it (NULL for JSON null). */
const char *keel__change_text(keel_change *c, json_t *value);
/* Column of a row object; *present tells whether the key exists. */
const char *keel__change_column(keel_change *c, json_t *row, const char *column, bool *present);

#endif
