/* The trigger that turns row changes into keel's JSON notifications, and its
 * installer. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "keel/listen.h"
#include "listen/filter.h"

/* One function per database. TG_ARGV[0] is the channel, the rest are the
 * key columns. A payload over NOTIFY's 8000-byte limit is replaced by the
 * key only; the listener then fetches the row. */
#define KEEL_NOTIFY_FUNCTION_SQL                                                                  \
  "CREATE OR REPLACE FUNCTION keel_notify_change() RETURNS trigger\n"                             \
  "LANGUAGE plpgsql AS $keel$\n"                                                                  \
  "DECLARE\n"                                                                                     \
  "  new_row jsonb;\n"                                                                            \
  "  old_row jsonb;\n"                                                                            \
  "  key jsonb := '{}';\n"                                                                        \
  "  ts bigint := (extract(epoch from clock_timestamp()) * 1000000)::bigint;\n"                   \
  "  payload text;\n"                                                                             \
  "  overflow_id bigint;\n"                                                                       \
  "BEGIN\n"                                                                                       \
  "  IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;\n"                               \
  "  IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;\n"                               \
  "  FOR i IN 1 .. TG_NARGS - 1 LOOP\n"                                                           \
  "    key := key || jsonb_build_object(TG_ARGV[i], COALESCE(new_row, old_row) -> TG_ARGV[i]);\n" \
  "  END LOOP;\n"                                                                                 \
  "  payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table',\n"            \
  "    TG_TABLE_NAME, 'ts_us', ts, 'pk', key, 'new', new_row, 'old', old_row)::text;\n"           \
  "  IF octet_length(payload) > 7999 THEN\n"                                                      \
  "    INSERT INTO public.keel_overflow (payload) VALUES (payload) RETURNING id INTO "            \
  "overflow_id;\n"                                                                                \
  "    payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table',\n"          \
  "      TG_TABLE_NAME, 'ts_us', ts, 'overflow', overflow_id, 'pk', key)::text;\n"                \
  "    IF octet_length(payload) > 7999 THEN\n"                                                    \
  "      payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table',\n"        \
  "        TG_TABLE_NAME, 'ts_us', ts, 'overflow', overflow_id)::text;\n"                         \
  "    END IF;\n"                                                                                 \
  "  END IF;\n"                                                                                   \
  "  PERFORM pg_notify(TG_ARGV[0], payload);\n"                                                   \
  "  RETURN NULL;\n"                                                                              \
  "END\n"                                                                                         \
  "$keel$"

/* Where a change too large for NOTIFY waits, read by primary key; the
 * listener sweeps rows older than ten minutes. */
#define KEEL_OVERFLOW_TABLE_SQL                                                 \
  "CREATE TABLE IF NOT EXISTS public.keel_overflow (id bigserial PRIMARY KEY, " \
  "created timestamptz NOT NULL DEFAULT now(), payload text NOT NULL)"

static const char notify_function_sql[] = KEEL_OVERFLOW_TABLE_SQL ";\n" KEEL_NOTIFY_FUNCTION_SQL;

/* What install() runs: CREATE OR REPLACE of one function by concurrent
 * installers fails with "tuple concurrently updated", so they take turns
 * on an advisory lock held for the DO block's transaction. */
static const char locked_function_sql[] =
    "DO $do$ BEGIN PERFORM pg_advisory_xact_lock(hashtext('keel_notify_change')); "
    "EXECUTE $tb$" KEEL_OVERFLOW_TABLE_SQL
    "$tb$; "
    "EXECUTE $fn$" KEEL_NOTIFY_FUNCTION_SQL "$fn$; END $do$";

/* Appends a SQL string literal that reads the same whatever
 * standard_conforming_strings says (E'it''s \\ ok'). Returns false when out
 * of room. */
static bool append_literal(char *buf, size_t cap, size_t *at, const char *text, size_t len) {
  if (*at + 3 >= cap) return false;
  buf[(*at)++] = 'E';
  buf[(*at)++] = '\'';
  for (size_t i = 0; i < len; i++) {
    if (*at + 3 >= cap) return false;
    if (text[i] == '\'' || text[i] == '\\') buf[(*at)++] = text[i];
    buf[(*at)++] = text[i];
  }
  buf[(*at)++] = '\'';
  buf[*at] = '\0';
  return true;
}

static bool append(char *buf, size_t cap, size_t *at, const char *text) {
  size_t len = strlen(text);
  if (*at + len + 1 > cap) return false;
  memcpy(buf + *at, text, len + 1);
  *at += len;
  return true;
}

static bool append_events(char *buf, size_t cap, size_t *at, unsigned events) {
  bool first = true;
  static const struct {
    unsigned bit;
    const char *name;
  } names[] = {{KEEL_CHANGE_INSERT, "INSERT"},
               {KEEL_CHANGE_UPDATE, "UPDATE"},
               {KEEL_CHANGE_DELETE, "DELETE"}};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    if (!(events & names[i].bit)) continue;
    if (!append(buf, cap, at, first ? "" : " OR ") || !append(buf, cap, at, names[i].name))
      return false;
    first = false;
  }
  return true;
}

/* The trigger names of a table: "keel_notify_<table>" and the same with
 * "_del". When they would not fit in 63 bytes (NAMEDATALEN - 1), the table
 * part is cut on a UTF-8 character boundary and followed by "_" and 8 hex
 * digits of the FNV-1a hash of the whole table name, so that long names
 * stay valid, distinct and stable. name_cap must be at least 64. */
static void trigger_names(const char *bare, char *name, char *del, size_t cap) {
  static const char prefix[] = "keel_notify_";
  size_t len = strlen(bare);
  if (sizeof prefix - 1 + len + 4 <= 63) {
    snprintf(name, cap, "%s%s", prefix, bare);
  } else {
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < len; i++) hash = (hash ^ (unsigned char)bare[i]) * 16777619u;
    size_t keep = 63 - 4 - 9 - (sizeof prefix - 1);
    while (keep > 0 && ((unsigned char)bare[keep] & 0xC0) == 0x80) keep--; /* char boundary */
    snprintf(name, cap, "%s%.*s_%08x", prefix, (int)keep, bare, (unsigned)hash);
  }
  snprintf(del, cap, "%.63s_del", name);
}

/* Ends the statement at *at with a NUL and starts the next one after it. */
static bool next_statement(char *buf, size_t cap, size_t *at, int *count) {
  if (*at + 1 >= cap) return false;
  buf[(*at)++] = '\0';
  buf[*at] = '\0';
  (*count)++;
  return true;
}

/* CREATE TRIGGER name AFTER events ON table FOR EACH ROW [WHEN (cond)]
 * EXECUTE FUNCTION keel_notify_change('channel', 'k1', ...) */
static int create_trigger(char *buf, size_t cap, size_t *at, const char *quoted_trigger,
                          const char *quoted_table, unsigned events, const keel__filter *filter,
                          const char *row, const char *channel, const char *key_columns) {
  if (!append(buf, cap, at, "CREATE TRIGGER ") || !append(buf, cap, at, quoted_trigger) ||
      !append(buf, cap, at, " AFTER ") || !append_events(buf, cap, at, events) ||
      !append(buf, cap, at, " ON ") || !append(buf, cap, at, quoted_table) ||
      !append(buf, cap, at, " FOR EACH ROW"))
    return UV_ENOBUFS;
  if (filter->count > 0) {
    /* row NULL: an UPDATE, sent when the old or the new row matches, so that
     * rows entering and leaving the filter are seen */
    if (!append(buf, cap, at, row != NULL ? " WHEN (" : " WHEN ((")) return UV_ENOBUFS;
    int n = keel__filter_to_sql(filter, row != NULL ? row : "NEW", buf + *at, cap - *at);
    if (n < 0) return n;
    *at += (size_t)n;
    if (row == NULL) {
      if (!append(buf, cap, at, ") OR (")) return UV_ENOBUFS;
      n = keel__filter_to_sql(filter, "OLD", buf + *at, cap - *at);
      if (n < 0) return n;
      *at += (size_t)n;
      if (!append(buf, cap, at, ")")) return UV_ENOBUFS;
    }
    if (!append(buf, cap, at, ")")) return UV_ENOBUFS;
  }
  if (!append(buf, cap, at, " EXECUTE FUNCTION keel_notify_change(") ||
      !append_literal(buf, cap, at, channel, strlen(channel)))
    return UV_ENOBUFS;
  const char *column = key_columns;
  while (*column != '\0') {
    const char *comma = strchr(column, ',');
    size_t len = comma ? (size_t)(comma - column) : strlen(column);
    while (len > 0 && *column == ' ') column++, len--;
    while (len > 0 && column[len - 1] == ' ') len--;
    if (len == 0) return UV_EINVAL;
    if (!append(buf, cap, at, ", ") || !append_literal(buf, cap, at, column, len))
      return UV_ENOBUFS;
    if (comma == NULL) break;
    column = comma + 1;
  }
  if (!append(buf, cap, at, ")")) return UV_ENOBUFS;
  return 0;
}

/* Writes the trigger statements separated by NULs into buf: the two DROP
 * TRIGGER IF EXISTS (row trigger and delete trigger), then one CREATE
 * TRIGGER without a filter, or with a filter one for INSERT/UPDATE (WHEN on
 * NEW) and one for DELETE (WHEN on OLD), each only for events in the mask.
 * Returns the number of statements. */
static int trigger_sql(char *buf, size_t cap, const char *table, const char *key_columns,
                       const char *channel, unsigned events, const keel__filter *filter) {
  char quoted_table[160], name[80], del[80], upd[96], quoted_trigger[180], quoted_delete[180],
      quoted_update[180];
  if (keel_pg_quote_ident(quoted_table, sizeof quoted_table, table, true) < 0) return UV_EINVAL;
  if (events == 0 || events > KEEL_CHANGE_ALL) return UV_EINVAL;
  if (keel_listener_validate_channel(channel, NULL, 0) != 0) return UV_EINVAL;
  const char *bare = strchr(table, '.') ? strchr(table, '.') + 1 : table;
  trigger_names(bare, name, del, sizeof name);
  snprintf(upd, sizeof upd, "%.63s_upd", name);
  if (keel_pg_quote_ident(quoted_trigger, sizeof quoted_trigger, name, false) < 0 ||
      keel_pg_quote_ident(quoted_delete, sizeof quoted_delete, del, false) < 0 ||
      keel_pg_quote_ident(quoted_update, sizeof quoted_update, upd, false) < 0)
    return UV_EINVAL;
  if (key_columns == NULL || key_columns[0] == '\0') return UV_EINVAL;
  size_t at = 0;
  int count = 0, rc;
  if (!append(buf, cap, &at, "DROP TRIGGER IF EXISTS ") || !append(buf, cap, &at, quoted_trigger) ||
      !append(buf, cap, &at, " ON ") || !append(buf, cap, &at, quoted_table) ||
      !next_statement(buf, cap, &at, &count) || !append(buf, cap, &at, "DROP TRIGGER IF EXISTS ") ||
      !append(buf, cap, &at, quoted_delete) || !append(buf, cap, &at, " ON ") ||
      !append(buf, cap, &at, quoted_table) || !next_statement(buf, cap, &at, &count) ||
      !append(buf, cap, &at, "DROP TRIGGER IF EXISTS ") || !append(buf, cap, &at, quoted_update) ||
      !append(buf, cap, &at, " ON ") || !append(buf, cap, &at, quoted_table) ||
      !next_statement(buf, cap, &at, &count))
    return UV_ENOBUFS;
  if (filter->count == 0) {
    rc = create_trigger(buf, cap, &at, quoted_trigger, quoted_table, events, filter, "NEW", channel,
                        key_columns);
    if (rc != 0) return rc;
    if (!next_statement(buf, cap, &at, &count)) return UV_ENOBUFS;
    return count;
  }
  if (events & KEEL_CHANGE_INSERT) {
    rc = create_trigger(buf, cap, &at, quoted_trigger, quoted_table, KEEL_CHANGE_INSERT, filter,
                        "NEW", channel, key_columns);
    if (rc != 0) return rc;
    if (!next_statement(buf, cap, &at, &count)) return UV_ENOBUFS;
  }
  if (events & KEEL_CHANGE_UPDATE) {
    rc = create_trigger(buf, cap, &at, quoted_update, quoted_table, KEEL_CHANGE_UPDATE, filter,
                        NULL, channel, key_columns);
    if (rc != 0) return rc;
    if (!next_statement(buf, cap, &at, &count)) return UV_ENOBUFS;
  }
  if (events & KEEL_CHANGE_DELETE) {
    rc = create_trigger(buf, cap, &at, quoted_delete, quoted_table, KEEL_CHANGE_DELETE, filter,
                        "OLD", channel, key_columns);
    if (rc != 0) return rc;
    if (!next_statement(buf, cap, &at, &count)) return UV_ENOBUFS;
  }
  return count;
}

/* Room for the trigger statements of a filter of this length. */
static size_t trigger_sql_cap(const char *filter, const char *key_columns) {
  size_t f = filter != NULL ? strlen(filter) : 0;
  size_t k = key_columns != NULL ? strlen(key_columns) : 0;
  return 2560 + 6 * k + 4 * (600 + 40 * f);
}

int keel_listener_install_filtered_sql(char *buf, size_t cap, const char *table,
                                       const char *key_columns, const char *channel,
                                       unsigned events, const char *filter) {
  if (buf == NULL || table == NULL) return UV_EINVAL;
  if (channel == NULL) channel = KEEL_LISTEN_DEFAULT_CHANNEL;
  keel__filter parsed;
  int rc = keel__filter_parse(&parsed, filter, NULL, 0);
  if (rc != 0) return rc;
  size_t tcap = trigger_sql_cap(filter, key_columns);
  char *trigger = keel__malloc(tcap);
  if (trigger == NULL) {
    keel__filter_free(&parsed);
    return UV_ENOMEM;
  }
  int count = trigger_sql(trigger, tcap, table, key_columns, channel, events, &parsed);
  keel__filter_free(&parsed);
  if (count < 0) {
    keel__free(trigger);
    return count;
  }
  /* Run as one string (one implicit transaction) or inside a migration's
   * transaction, the lock makes concurrent installs take turns, as
   * keel_listener_install() does: CREATE OR REPLACE FUNCTION run at once by
   * two sessions fails with "tuple concurrently updated". */
  int n = snprintf(buf, cap, "SELECT pg_advisory_xact_lock(hashtext('keel_notify_change'));\n%s;\n",
                   notify_function_sql);
  size_t at = n < 0 ? cap : (size_t)n;
  const char *stmt = trigger;
  for (int i = 0; i < count && at < cap; i++) {
    n = snprintf(buf + at, cap - at, "%s;\n", stmt);
    at = n < 0 ? cap : at + (size_t)n;
    stmt += strlen(stmt) + 1;
  }
  keel__free(trigger);
  if (at >= cap) return UV_ENOBUFS;
  return (int)at;
}

int keel_listener_install_sql(char *buf, size_t cap, const char *table, const char *key_columns,
                              const char *channel) {
  return keel_listener_install_filtered_sql(buf, cap, table, key_columns, channel, KEEL_CHANGE_ALL,
                                            NULL);
}

typedef struct install_job {
  keel_listener_install_cb cb;
  void *data;
  char *table;
  char *channel;
  char *filter; /* NULL = none */
  unsigned events;
  char *statements; /* NUL-separated */
  const char *next; /* the next statement to run */
  int remaining;    /* statements left after the function */
} install_job;

static void install_finish(keel_pg *conn, install_job *job, int status) {
  keel_listener_install_cb cb = job->cb;
  void *data = job->data;
  keel__free(job->table);
  keel__free(job->channel);
  keel__free(job->filter);
  keel__free(job->statements);
  keel__free(job);
  if (cb != NULL) cb(conn, status, data);
}

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data);

static void run_step(keel_pg *conn, install_job *job) {
  const char *sql = job->next;
  job->next += strlen(sql) + 1;
  job->remaining--;
  int rc = keel_pg_query(conn, sql, 0, NULL, install_step, job);
  if (rc != 0) install_finish(conn, job, rc);
}

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  install_job *job = data;
  if (status != 0 || job->remaining == 0) {
    install_finish(conn, job, status);
    return;
  }
  run_step(conn, job);
}

static int prepare_statements(install_job *job, const char *key_columns) {
  size_t cap = trigger_sql_cap(job->filter, key_columns);
  keel__filter parsed;
  int rc = keel__filter_parse(&parsed, job->filter, NULL, 0);
  if (rc != 0) return rc;
  job->statements = keel__malloc(cap);
  if (job->statements == NULL) {
    keel__filter_free(&parsed);
    return UV_ENOMEM;
  }
  int count = trigger_sql(job->statements, cap, job->table, key_columns, job->channel, job->events,
                          &parsed);
  keel__filter_free(&parsed);
  if (count < 0) return count;
  /* One DO block, so that the drops and creates take effect together: a
   * CREATE that fails (a column the table lacks, a literal its type cannot
   * read) leaves the table's old triggers in place. Its dollar-quote tag
   * is one that occurs nowhere in the statements. */
  size_t total = 0;
  const char *stmt = job->statements;
  for (int i = 0; i < count; i++) {
    total += strlen(stmt) + 2;
    stmt += strlen(stmt) + 1;
  }
  char tag[32];
  unsigned n = 0;
  for (;;) {
    snprintf(tag, sizeof tag, "$keel_install_%u$", n++);
    bool used = false;
    stmt = job->statements;
    for (int i = 0; i < count && !used; i++) {
      used = strstr(stmt, tag) != NULL;
      stmt += strlen(stmt) + 1;
    }
    if (!used) break;
  }
  size_t block_cap = total + 2 * strlen(tag) + 64;
  char *block = keel__malloc(block_cap + 1);
  if (block == NULL) return UV_ENOMEM;
  size_t at = (size_t)snprintf(block, block_cap, "DO %s BEGIN\n", tag);
  stmt = job->statements;
  for (int i = 0; i < count; i++) {
    at += (size_t)snprintf(block + at, block_cap - at, "%s;\n", stmt);
    stmt += strlen(stmt) + 1;
  }
  at += (size_t)snprintf(block + at, block_cap - at, "END %s", tag);
  block[at + 1] = '\0'; /* a second NUL: the list of statements ends */
  keel__free(job->statements);
  job->statements = block;
  job->next = job->statements;
  job->remaining = 1;
  return 0;
}

static void on_primary_key(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  install_job *job = data;
  const char *columns = keel_pg_result_value(res, 0, 0);
  if (status != 0) {
    install_finish(conn, job, status);
    return;
  }
  if (columns == NULL) { /* the table has no primary key: name key_columns */
    install_finish(conn, job, KEEL_ENOTFOUND);
    return;
  }
  int rc = prepare_statements(job, columns);
  if (rc != 0) {
    install_finish(conn, job, rc);
    return;
  }
  rc = keel_pg_query(conn, locked_function_sql, 0, NULL, install_step, job);
  if (rc != 0) install_finish(conn, job, rc);
}

int keel_listener_install_filtered(keel_pg *conn, const char *table, const char *key_columns,
                                   const char *channel, unsigned events, const char *filter,
                                   keel_listener_install_cb cb, void *data) {
  char quoted[160];
  if (conn == NULL || table == NULL ||
      keel_pg_quote_ident(quoted, sizeof quoted, table, true) < 0 || events == 0 ||
      events > KEEL_CHANGE_ALL ||
      keel_listener_validate_channel(channel != NULL ? channel : KEEL_LISTEN_DEFAULT_CHANNEL, NULL,
                                     0) != 0)
    return UV_EINVAL;
  keel__filter check;
  int rc = keel__filter_parse(&check, filter, NULL, 0);
  if (rc != 0) return rc;
  keel__filter_free(&check);
  install_job *job = keel__calloc(1, sizeof *job);
  if (job == NULL) return UV_ENOMEM;
  job->cb = cb;
  job->data = data;
  job->table = keel__strdup(table);
  job->channel = keel__strdup(channel != NULL ? channel : KEEL_LISTEN_DEFAULT_CHANNEL);
  job->events = events;
  job->filter = filter != NULL && filter[0] != '\0' ? keel__strdup(filter) : NULL;
  if (job->table == NULL || job->channel == NULL ||
      (filter != NULL && filter[0] != '\0' && job->filter == NULL)) {
    keel__free(job->table);
    keel__free(job->channel);
    keel__free(job->filter);
    keel__free(job);
    return UV_ENOMEM;
  }
  if (key_columns != NULL) {
    rc = prepare_statements(job, key_columns);
    if (rc == 0) rc = keel_pg_query(conn, locked_function_sql, 0, NULL, install_step, job);
  } else {
    const char *params[] = {quoted};
    rc = keel_pg_query(conn,
                       "SELECT string_agg(a.attname, ',' ORDER BY array_position(i.indkey, "
                       "a.attnum)) FROM pg_index i JOIN pg_attribute a ON a.attrelid = "
                       "i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = "
                       "$1::regclass AND i.indisprimary",
                       1, params, on_primary_key, job);
  }
  if (rc != 0) {
    keel__free(job->table);
    keel__free(job->channel);
    keel__free(job->filter);
    keel__free(job->statements);
    keel__free(job);
  }
  return rc;
}

int keel_listener_install(keel_pg *conn, const char *table, const char *key_columns,
                          const char *channel, keel_listener_install_cb cb, void *data) {
  return keel_listener_install_filtered(conn, table, key_columns, channel, KEEL_CHANGE_ALL, NULL,
                                        cb, data);
}
