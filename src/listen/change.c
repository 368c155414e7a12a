#include "listen/change.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"

static int proto(char *why, size_t cap, const char *reason) {
  if (why != NULL && cap > 0) snprintf(why, cap, "malformed change payload: %s", reason);
  return KEEL_EPROTO;
}

int keel__change_parse(keel_change *c, const char *payload, char *why, size_t cap) {
  memset(c, 0, sizeof *c);
  if (payload == NULL) return proto(why, cap, "empty");
  json_error_t error;
  c->root = json_loads(payload, JSON_REJECT_DUPLICATES, &error);
  if (c->root == NULL) return proto(why, cap, "not valid JSON");
  c->raw = payload;
  if (!json_is_object(c->root)) return proto(why, cap, "not a JSON object");
  const char *op = json_string_value(json_object_get(c->root, "op"));
  if (op == NULL) return proto(why, cap, "no \"op\"");
  if (strcmp(op, "INSERT") == 0)
    c->op = KEEL_CHANGE_INSERT;
  else if (strcmp(op, "UPDATE") == 0)
    c->op = KEEL_CHANGE_UPDATE;
  else if (strcmp(op, "DELETE") == 0)
    c->op = KEEL_CHANGE_DELETE;
  else
    return proto(why, cap, "\"op\" is not INSERT, UPDATE or DELETE");
  c->schema = json_string_value(json_object_get(c->root, "schema"));
  c->table = json_string_value(json_object_get(c->root, "table"));
  if (c->schema == NULL || c->table == NULL) return proto(why, cap, "no \"schema\" or \"table\"");
  json_t *ts = json_object_get(c->root, "ts_us");
  if (!json_is_integer(ts)) return proto(why, cap, "no integer \"ts_us\"");
  /* Anyone may NOTIFY on the channel: a time outside 1970..9999 is not
   * keel's, and would overflow the latency arithmetic. */
  json_int_t ts_value = json_integer_value(ts);
  if (ts_value < 0 || ts_value > KEEL__CHANGE_MAX_TIME_US)
    return proto(why, cap, "\"ts_us\" out of range");
  c->time_us = (int64_t)ts_value;
  json_t *key = json_object_get(c->root, "pk");
  if (key != NULL && !json_is_object(key)) return proto(why, cap, "\"pk\" is not an object");
  c->key = key;
  json_t *new_row = json_object_get(c->root, "new");
  json_t *old_row = json_object_get(c->root, "old");
  if (new_row != NULL && !json_is_object(new_row) && !json_is_null(new_row))
    return proto(why, cap, "\"new\" is not an object");
  if (old_row != NULL && !json_is_object(old_row) && !json_is_null(old_row))
    return proto(why, cap, "\"old\" is not an object");
  c->new_row = json_is_object(new_row) ? new_row : NULL;
  c->old_row = json_is_object(old_row) ? old_row : NULL;
  c->key_only = json_is_true(json_object_get(c->root, "key_only"));
  if (c->key_only && c->key == NULL) return proto(why, cap, "a key-only change without \"pk\"");
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
  if (c->root != NULL) json_decref(c->root);
  c->root = NULL;
}

static const char *remember(keel_change *c, const char *text, size_t len) {
  keel__text *t = keel__malloc(sizeof *t + len + 1);
  if (t == NULL) return NULL;
  memcpy(t->text, text, len);
  t->text[len] = '\0';
  t->next = c->texts;
  c->texts = t;
  return t->text;
}

const char *keel__change_text(keel_change *c, json_t *value) {
  char buf[64];
  switch (json_typeof(value)) {
    case JSON_STRING:
      return json_string_value(value);
    case JSON_INTEGER: {
      int n = snprintf(buf, sizeof buf, "%" JSON_INTEGER_FORMAT, json_integer_value(value));
      return remember(c, buf, (size_t)n);
    }
    case JSON_REAL: {
      int n = snprintf(buf, sizeof buf, "%.17g", json_real_value(value));
      return remember(c, buf, (size_t)n);
    }
    case JSON_TRUE:
      return "true";
    case JSON_FALSE:
      return "false";
    case JSON_OBJECT:
    case JSON_ARRAY: {
      char *dumped = json_dumps(value, JSON_COMPACT);
      if (dumped == NULL) return NULL;
      const char *kept = remember(c, dumped, strlen(dumped));
      free(dumped); /* jansson's allocator */
      return kept;
    }
    case JSON_NULL:
    default:
      return NULL;
  }
}

const char *keel__change_column(keel_change *c, json_t *row, const char *column, bool *present) {
  json_t *value = row != NULL && column != NULL ? json_object_get(row, column) : NULL;
  if (present != NULL) *present = value != NULL;
  return value == NULL ? NULL : keel__change_text(c, value);
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

/* Accessors take a const change but format texts into its cache, which is
 * not part of its observable value. */
const char *keel_change_new(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column((keel_change *)c, c->new_row, column, NULL);
}

const char *keel_change_old(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column((keel_change *)c, c->old_row, column, NULL);
}

bool keel_change_has_new(const keel_change *c) {
  return c != NULL && c->new_row != NULL;
}

bool keel_change_has_old(const keel_change *c) {
  return c != NULL && c->old_row != NULL;
}

const char *keel_change_key(const keel_change *c, const char *column) {
  return c == NULL ? NULL : keel__change_column((keel_change *)c, c->key, column, NULL);
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

int64_t keel_change_latency_us(const keel_change *c) {
  return c == NULL ? 0 : c->latency_us;
}
