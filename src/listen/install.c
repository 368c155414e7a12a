/* The trigger that turns row changes into keel's JSON notifications, and its
 * installer. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "keel/listen.h"

/* One function per database. TG_ARGV[0] is the channel, the rest are the
 * key columns. A payload over NOTIFY's 8000-byte limit is replaced by the
 * key only; the listener then fetches the row. */
static const char notify_function_sql[] =
    "CREATE OR REPLACE FUNCTION keel_notify_change() RETURNS trigger\n"
    "LANGUAGE plpgsql AS $keel$\n"
    "DECLARE\n"
    "  new_row jsonb;\n"
    "  old_row jsonb;\n"
    "  key jsonb := '{}';\n"
    "  ts bigint := (extract(epoch from clock_timestamp()) * 1000000)::bigint;\n"
    "  payload text;\n"
    "BEGIN\n"
    "  IF TG_OP <> 'DELETE' THEN new_row := to_jsonb(NEW); END IF;\n"
    "  IF TG_OP <> 'INSERT' THEN old_row := to_jsonb(OLD); END IF;\n"
    "  FOR i IN 1 .. TG_NARGS - 1 LOOP\n"
    "    key := key || jsonb_build_object(TG_ARGV[i], COALESCE(new_row, old_row) -> TG_ARGV[i]);\n"
    "  END LOOP;\n"
    "  payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table',\n"
    "    TG_TABLE_NAME, 'ts_us', ts, 'pk', key, 'new', new_row, 'old', old_row)::text;\n"
    "  IF octet_length(payload) > 7999 THEN\n"
    "    payload := jsonb_build_object('op', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table',\n"
    "      TG_TABLE_NAME, 'ts_us', ts, 'pk', key, 'key_only', true)::text;\n"
    "  END IF;\n"
    "  PERFORM pg_notify(TG_ARGV[0], payload);\n"
    "  RETURN NULL;\n"
    "END\n"
    "$keel$";

/* Appends a SQL string literal ('it''s'). Returns false when out of room. */
static bool append_literal(char *buf, size_t cap, size_t *at, const char *text, size_t len) {
  if (*at + 2 >= cap) return false;
  buf[(*at)++] = '\'';
  for (size_t i = 0; i < len; i++) {
    if (*at + 3 >= cap) return false;
    if (text[i] == '\'') buf[(*at)++] = '\'';
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

/* Writes "DROP TRIGGER ...;" and "CREATE TRIGGER ..." as two statements
 * separated by a NUL (drop_len receives the first's length). */
static int trigger_sql(char *buf, size_t cap, const char *table, const char *key_columns,
                       const char *channel, size_t *drop_len) {
  char quoted_table[160], trigger_name[80], quoted_trigger[180];
  if (keel_pg_quote_ident(quoted_table, sizeof quoted_table, table, true) < 0) return UV_EINVAL;
  const char *bare = strchr(table, '.') ? strchr(table, '.') + 1 : table;
  snprintf(trigger_name, sizeof trigger_name, "keel_notify_%.50s", bare);
  if (keel_pg_quote_ident(quoted_trigger, sizeof quoted_trigger, trigger_name, false) < 0)
    return UV_EINVAL;
  if (key_columns == NULL || key_columns[0] == '\0') return UV_EINVAL;
  size_t at = 0;
  if (!append(buf, cap, &at, "DROP TRIGGER IF EXISTS ") || !append(buf, cap, &at, quoted_trigger) ||
      !append(buf, cap, &at, " ON ") || !append(buf, cap, &at, quoted_table))
    return UV_ENOBUFS;
  *drop_len = at;
  at++; /* keep the NUL: the next statement starts after it */
  if (at >= cap) return UV_ENOBUFS;
  if (!append(buf, cap, &at, "CREATE TRIGGER ") || !append(buf, cap, &at, quoted_trigger) ||
      !append(buf, cap, &at, " AFTER INSERT OR UPDATE OR DELETE ON ") ||
      !append(buf, cap, &at, quoted_table) ||
      !append(buf, cap, &at, " FOR EACH ROW EXECUTE FUNCTION keel_notify_change(") ||
      !append_literal(buf, cap, &at, channel, strlen(channel)))
    return UV_ENOBUFS;
  const char *column = key_columns;
  while (*column != '\0') {
    const char *comma = strchr(column, ',');
    size_t len = comma ? (size_t)(comma - column) : strlen(column);
    while (len > 0 && *column == ' ') column++, len--;
    while (len > 0 && column[len - 1] == ' ') len--;
    if (len == 0) return UV_EINVAL;
    if (!append(buf, cap, &at, ", ") || !append_literal(buf, cap, &at, column, len))
      return UV_ENOBUFS;
    if (comma == NULL) break;
    column = comma + 1;
  }
  if (!append(buf, cap, &at, ")")) return UV_ENOBUFS;
  return (int)at;
}

int keel_listener_install_sql(char *buf, size_t cap, const char *table, const char *key_columns,
                              const char *channel) {
  if (buf == NULL || table == NULL) return UV_EINVAL;
  if (channel == NULL) channel = KEEL_LISTEN_DEFAULT_CHANNEL;
  char trigger[2048];
  size_t drop_len = 0;
  int len = trigger_sql(trigger, sizeof trigger, table, key_columns, channel, &drop_len);
  if (len < 0) return len;
  int n =
      snprintf(buf, cap, "%s;\n%s;\n%s;\n", notify_function_sql, trigger, trigger + drop_len + 1);
  if (n < 0 || (size_t)n >= cap) return UV_ENOBUFS;
  return n;
}

typedef struct install_job {
  keel_listener_install_cb cb;
  void *data;
  char *table;
  char *channel;
  char *statements; /* drop, NUL, create */
  size_t drop_len;
  int step;
} install_job;

static void install_finish(keel_pg *conn, install_job *job, int status) {
  keel_listener_install_cb cb = job->cb;
  void *data = job->data;
  keel__free(job->table);
  keel__free(job->channel);
  keel__free(job->statements);
  keel__free(job);
  if (cb != NULL) cb(conn, status, data);
}

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data);

static void run_step(keel_pg *conn, install_job *job) {
  const char *sql = job->step == 0   ? notify_function_sql
                    : job->step == 1 ? job->statements
                                     : job->statements + job->drop_len + 1;
  int rc = keel_pg_query(conn, sql, 0, NULL, install_step, job);
  if (rc != 0) install_finish(conn, job, rc);
}

static void install_step(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)res;
  install_job *job = data;
  if (status != 0 || ++job->step == 3) {
    install_finish(conn, job, status);
    return;
  }
  run_step(conn, job);
}

static int prepare_statements(install_job *job, const char *key_columns) {
  job->statements = keel__malloc(2048);
  if (job->statements == NULL) return UV_ENOMEM;
  int len =
      trigger_sql(job->statements, 2048, job->table, key_columns, job->channel, &job->drop_len);
  return len < 0 ? len : 0;
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
  run_step(conn, job);
}

int keel_listener_install(keel_pg *conn, const char *table, const char *key_columns,
                          const char *channel, keel_listener_install_cb cb, void *data) {
  char quoted[160];
  if (conn == NULL || table == NULL || keel_pg_quote_ident(quoted, sizeof quoted, table, true) < 0)
    return UV_EINVAL;
  install_job *job = keel__calloc(1, sizeof *job);
  if (job == NULL) return UV_ENOMEM;
  job->cb = cb;
  job->data = data;
  job->table = keel__strdup(table);
  job->channel = keel__strdup(channel != NULL ? channel : KEEL_LISTEN_DEFAULT_CHANNEL);
  if (job->table == NULL || job->channel == NULL) {
    keel__free(job->table);
    keel__free(job->channel);
    keel__free(job);
    return UV_ENOMEM;
  }
  int rc;
  if (key_columns != NULL) {
    rc = prepare_statements(job, key_columns);
    if (rc == 0) rc = keel_pg_query(conn, notify_function_sql, 0, NULL, install_step, job);
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
    keel__free(job->statements);
    keel__free(job);
  }
  return rc;
}
