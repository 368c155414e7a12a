/*
 * keel/listen.h — a PostgreSQL change listener on LISTEN/NOTIFY.
 *
 * A trigger (installed by keel_listener_install(), or with the SQL in
 * docs/listen.md) sends every INSERT, UPDATE and DELETE of a table as a JSON
 * NOTIFY. A listener keeps one connection, LISTENs on the channels of its
 * tables, parses each change once, applies the subscription's filter
 * (PostgREST syntax) and calls every registered handler. It reconnects after
 * a loss, LISTENs again and reports the gap so that handlers can
 * resynchronise: NOTIFY is at-most-once while nobody listens.
 * keel_listener_install_filtered() also pushes the events mask and the filter
 * into the trigger (a WHEN condition), so that unwanted changes are never
 * sent.
 *
 * Callbacks (handlers, on_gap, on_error, raw channel callbacks, the close
 * callback) never run inside a keel call: always on a later loop iteration.
 * keel_listener_close() may be called from inside any of them. After close
 * began, every other call on the listener returns KEEL_ECLOSING.
 *
 *     keel_listener_opts o;
 *     keel_listener_opts_init(&o);
 *     o.conninfo = "host=... dbname=...";
 *     o.table = "public.projects";
 *     o.events = KEEL_CHANGE_UPDATE;          // the seed's event: 'UPDATE'
 *     o.filter = "team_id=eq.123";            // the seed's filter
 *     keel_listener *l;
 *     keel_listener_new(loop, &o, &l);
 *     keel_listener_on(l, "project-list", on_project, ui);
 *     keel_listener_start(l);
 *
 * Loop thread only.
 */
#ifndef KEEL_LISTEN_H
#define KEEL_LISTEN_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/pg.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct keel_listener keel_listener;
typedef struct keel_change keel_change;

/* Operations, also usable as a mask. */
typedef enum keel_change_op {
  KEEL_CHANGE_INSERT = 1,
  KEEL_CHANGE_UPDATE = 2,
  KEEL_CHANGE_DELETE = 4,
  KEEL_CHANGE_ALL = 7
} keel_change_op;

/* The channel keel's trigger notifies on unless told otherwise. */
#define KEEL_LISTEN_DEFAULT_CHANNEL "keel_changes"

/* How an UPDATE crossed the subscription's filter (keel_change_filter_transition). */
typedef enum keel_change_transition {
  KEEL_CHANGE_INSIDE = 0, /* matches after the change (and before, for an UPDATE); also every
                             INSERT and DELETE delivered, and every change without a filter */
  KEEL_CHANGE_ENTER = 1,  /* UPDATE: the old row did not match, the new row does */
  KEEL_CHANGE_LEAVE = 2   /* UPDATE: the old row matched, the new row does not (or the old
                             row is unknown, behind a trigger of an older keel that re-read
                             oversize rows by key, and the new does not match) */
} keel_change_transition;

/* ---- the change handed to handlers (valid during the call only) ------- */

/* Accessors of the change a handler receives. The change and every string
 * they return belong to keel and are valid until the handler returns (copy
 * what you keep). A NULL change gives 0 / NULL / false. Loop thread only
 * (inside the handler). */

KEEL_EXTERN keel_change_op keel_change_operation(const keel_change *c);
/* "INSERT", "UPDATE" or "DELETE". */
KEEL_EXTERN const char *keel_change_operation_name(const keel_change *c);
KEEL_EXTERN const char *keel_change_schema(const keel_change *c);
KEEL_EXTERN const char *keel_change_table(const keel_change *c);
/*
 * A column of the new row (INSERT, UPDATE) or the old row (UPDATE, DELETE)
 * as text, exactly as the column's type prints it (what `SELECT col`
 * returns in text format, DateStyle ISO, in the writer's TimeZone):
 * numeric 19.90 is "19.90", 30-digit numerics, NaN and Infinity are whole,
 * floats as float8out prints them ("1e-30"), timestamps "2024-01-01
 * 10:00:00+00", arrays "{1,2,NULL}", jsonb as jsonb prints it, bytea
 * "\x00ff"; booleans are "true" / "false". Nothing goes through a double.
 * Known limits of the to_jsonb() the trigger uses: a float -0 arrives as
 * "0", a json (not jsonb) value as jsonb would print it, a jsonb 'null' as
 * NULL, an array with lower bounds other than 1 without its "[2:3]=".
 * NULL when the column is SQL NULL, absent, or the row is absent.
 */
KEEL_EXTERN const char *keel_change_new(const keel_change *c, const char *column);
KEEL_EXTERN const char *keel_change_old(const keel_change *c, const char *column);
/* Whether the new / old row is present (a key-only change whose row is gone
 * has neither; use keel_change_key()). */
KEEL_EXTERN bool keel_change_has_new(const keel_change *c);
KEEL_EXTERN bool keel_change_has_old(const keel_change *c);
/* A primary-key column's value as text, NULL when unknown. */
KEEL_EXTERN const char *keel_change_key(const keel_change *c, const char *column);
/* The NOTIFY payload as received (JSON). */
KEEL_EXTERN const char *keel_change_json(const keel_change *c);
/* true when the change was too large for NOTIFY and was read from keel's
 * overflow table (as it was when it changed; both rows where the table
 * gives them). */
KEEL_EXTERN bool keel_change_was_fetched(const keel_change *c);
/* How an UPDATE crossed the filter: a filtered mirror inserts/updates the
 * row on KEEL_CHANGE_INSIDE and KEEL_CHANGE_ENTER, and removes it on
 * KEEL_CHANGE_LEAVE (keel_change_new() then gives the row as it is now,
 * outside the filter). */
KEEL_EXTERN keel_change_transition keel_change_filter_transition(const keel_change *c);
/* Wall-clock time of the change in the trigger (µs since the epoch). */
KEEL_EXTERN int64_t keel_change_time_us(const keel_change *c);
/* Receive latency: time of receipt minus the change's time, µs. */
KEEL_EXTERN int64_t keel_change_latency_us(const keel_change *c);

/* ---- callbacks ---------------------------------------------------------- */

typedef void (*keel_listener_handler)(keel_listener *l, const keel_change *change, void *data);

/* After a reconnect (LISTEN is active again): changes made during
 * `disconnected_ms` may have been missed. */
typedef void (*keel_listener_gap_cb)(keel_listener *l, uint64_t disconnected_ms, void *data);

/* A raw NOTIFY on a channel subscribed with keel_listener_listen_channel(). */
typedef void (*keel_listener_channel_cb)(keel_listener *l, const char *channel, const char *payload,
                                         void *data);

/* Something the listener cannot do right now, with the reason (also in
 * keel_listener_last_error()): a LISTEN that failed (the listener is
 * inactive and retries with reconnect_backoff); err KEEL_ENOTHEARING: its
 * own probe NOTIFY did not arrive within probe_timeout_ms (behind a
 * transaction pooler, a proxy that dropped LISTEN, a misrouted connection:
 * the listener is inactive, LISTENs again after reconnect_backoff and is
 * active again once a probe arrives); err UV_EINVAL: a filter the
 * table cannot answer (no such table or column, a value the column's type
 * cannot read, is.true/is.false on a non-boolean column; checked at every
 * connect, the listener stays inactive until the next connect or
 * stop/start). Called on a later loop iteration than any keel call,
 * never after close. */
typedef void (*keel_listener_error_cb)(keel_listener *l, int err, const char *message, void *data);

typedef struct keel_listener_opts {
  const char *conninfo;            /* required */
  const char *table;               /* "schema.table" or "table" (schema public); may be
                                      NULL for a listener of raw channels only */
  unsigned events;                 /* keel_change_op mask; default KEEL_CHANGE_ALL */
  const char *filter;              /* PostgREST filter, e.g. "team_id=eq.123&status=in.(a,b)";
                                      NULL = every row */
  const char *channel;             /* default KEEL_LISTEN_DEFAULT_CHANNEL */
  uint32_t heartbeat_ms;           /* a dead connection is noticed within this plus
                                      connect_timeout_ms; default 5000 */
  uint32_t connect_timeout_ms;     /* default 5000; also the deadline of each statement of
                                      the listener's session (then it reconnects) */
  keel_backoff reconnect_backoff;  /* default full jitter 100 ms x2, cap 5000 ms */
  keel_listener_gap_cb on_gap;     /* may be NULL */
  void *data;                      /* passed to on_gap and on_error */
  keel_listener_error_cb on_error; /* may be NULL */
  /* Self-probe (docs/listen.md, "Does it hear?"): while active, every
   * probe_interval_ms a second connection of the listener (same conninfo)
   * sends a NOTIFY with a unique payload on a channel only this listener
   * LISTENs to ("keel_probe_" + random hex); it must reach the listening
   * connection within probe_timeout_ms of its commit, else on_error gets
   * KEEL_ENOTHEARING, the listener is inactive and LISTENs again after
   * reconnect_backoff (active again only once a probe arrives). */
  uint32_t probe_interval_ms; /* default 5000; 0 = the default */
  uint32_t probe_timeout_ms;  /* default 5000; 0 = the default */
  bool no_probe;              /* default false: true = no probe, no second connection */
  uint64_t reserved_[8];      /* ABI room: zero (opts_init does); never set */
} keel_listener_opts;

/* Zeroes *opts and fills the defaults (NULL-safe). Thread-safe. */
KEEL_EXTERN void keel_listener_opts_init(keel_listener_opts *opts);

/*
 * Creates a listener (not started: nothing connects and no callback runs
 * until keel_listener_start()). Strings of opts are copied; the filter is
 * parsed now. opts.table may be NULL (raw channels only).
 * Returns 0 and sets *out; UV_EINVAL for a NULL loop, opts or out, a missing
 * conninfo, an invalid reconnect_backoff, an invalid table name (empty part,
 * part over 63 bytes, more than one '.'), an invalid channel (see
 * keel_listener_validate_channel), an events mask outside 1..7, or a
 * malformed filter / unknown operator (keel_listener_new_ex() writes the
 * reason); UV_ENOMEM. *out is untouched on failure, and nothing needs
 * freeing. Loop thread only.
 */
KEEL_EXTERN int keel_listener_new(uv_loop_t *loop, const keel_listener_opts *opts,
                                  keel_listener **out);

/* Like keel_listener_new(), and explains a failure: writes the reason
 * (NUL-terminated, truncated to why_cap) into why_buf, "" on success.
 * why_buf may be NULL. Errors as keel_listener_new(). Loop thread only. */
KEEL_EXTERN int keel_listener_new_ex(uv_loop_t *loop, const keel_listener_opts *opts,
                                     keel_listener **out, char *why_buf, size_t why_cap);

/*
 * Adds another table to the same connection: its changes (of `events`,
 * matching `filter`) go to the same handlers. channel NULL = the default.
 * Strings are copied. Safe inside a handler. When started and the channel
 * is new, the listener LISTENs on it at once and is inactive until that
 * LISTEN is done.
 * Returns 0; UV_EINVAL (NULL l, bad table, channel, events or filter; the
 * reason in keel_listener_last_error()), UV_ENOMEM (nothing added), or
 * KEEL_ECLOSING after close began. Loop thread only.
 */
KEEL_EXTERN int keel_listener_add_table(keel_listener *l, const char *table, unsigned events,
                                        const char *filter, const char *channel);

/*
 * LISTENs on a raw channel; each NOTIFY's payload goes to cb as is (strings
 * valid during the call). channel is copied and validated as
 * keel_listener_validate_channel() does. Returns 0; UV_EINVAL (NULL l or cb,
 * bad channel; reason in keel_listener_last_error()), UV_ENOMEM, or
 * KEEL_ECLOSING after close began. Loop thread only.
 */
KEEL_EXTERN int keel_listener_listen_channel(keel_listener *l, const char *channel,
                                             keel_listener_channel_cb cb, void *data);

/*
 * Registers a handler under an id (the seed's onChange(id, handler)); the
 * same id replaces the previous handler. id is copied. Safe inside a handler
 * (the new handler sees the next change). Returns 0; UV_EINVAL (NULL l, id
 * or handler); UV_ENOMEM (nothing registered); KEEL_ECLOSING after close
 * began. Loop thread only.
 */
KEEL_EXTERN int keel_listener_on(keel_listener *l, const char *id, keel_listener_handler handler,
                                 void *data);

/* Removes a handler (the seed's removeListener(id)); safe inside a handler
 * (it is not called again, not even for the change being delivered).
 * Returns 0; KEEL_ENOTFOUND (no such id); UV_EINVAL (NULL l or id);
 * KEEL_ECLOSING after close began. Loop thread only. */
KEEL_EXTERN int keel_listener_off(keel_listener *l, const char *id);

/*
 * Connects and LISTENs (the seed's start()) in the background: the
 * listener is active once every LISTEN is done (keel_listener_is_active).
 * No callback runs inside this call. Starting a started listener is a
 * no-op. Returns 0; UV_EINVAL (NULL l, or a conninfo keel_pg_new refuses;
 * reason in keel_listener_last_error()); UV_ENOMEM; KEEL_ECLOSING after
 * close began. Loop thread only.
 */
KEEL_EXTERN int keel_listener_start(keel_listener *l);

/*
 * Disconnects (the seed's stop()); handlers and subscriptions stay for a
 * later keel_listener_start(). Changes received but not yet delivered
 * (waiting for a row fetch) are dropped; no callback runs inside the call.
 * When the listener had been active, the next start reports a gap (on_gap,
 * keel_listener_gap_window()) covering what may have been missed: from the
 * last moment it knew it was caught up (or the oldest change dropped here,
 * if earlier) to when the new session's LISTENs are in place.
 * Safe inside a handler. Returns 0 (also when not started), UV_EINVAL for
 * NULL, KEEL_ECLOSING after close began. Loop thread only.
 */
KEEL_EXTERN int keel_listener_stop(keel_listener *l);

/*
 * The window of the last gap reported (call it from on_gap): every change
 * whose transaction committed after *from_us and before *to_us (server
 * clock, µs since the epoch) may have been missed; changes committed after
 * *to_us are delivered, after the gap event. *from_us is the last moment
 * the listener knew it was caught up (the server's time at the last
 * answered heartbeat, or when the previous session's LISTENs were in
 * place), not the moment it noticed the loss. A change's keel_change_time_us()
 * is taken inside its transaction, so it is at or before its commit: resync
 * rows changed at or after *from_us minus your longest write transaction.
 * Returns 0; KEEL_ENOTFOUND before the first gap; UV_EINVAL for NULL l
 * (out-params untouched on failure; either may be NULL). Loop thread only.
 */
KEEL_EXTERN int keel_listener_gap_window(const keel_listener *l, int64_t *from_us, int64_t *to_us);

/* true while connected with every LISTEN in place (the seed's isActive());
 * false for NULL. Loop thread only. */
KEEL_EXTERN bool keel_listener_is_active(const keel_listener *l);

typedef struct keel_listener_stats {
  uint64_t received;     /* counter: notifications received */
  uint64_t delivered;    /* counter: changes handed to handlers */
  uint64_t filtered;     /* counter: changes dropped by filter, table or mask */
  uint64_t malformed;    /* counter: payloads that are not keel's JSON */
  uint64_t fetched;      /* counter: oversize rows fetched by key */
  uint64_t reconnects;   /* counter */
  uint64_t gaps;         /* counter: on_gap reports */
  uint64_t raw;          /* counter: raw channel notifications */
  uint64_t entered;      /* counter: UPDATEs delivered as KEEL_CHANGE_ENTER */
  uint64_t left;         /* counter: UPDATEs delivered as KEEL_CHANGE_LEAVE */
  double latency_p50_us; /* change time → handler */
  double latency_p99_us;
  double latency_max_us;
  bool active; /* gauge */
  /* self-probe: one NOTIFY round trip through the listener's own channel */
  uint64_t probes_sent;     /* counter: probe NOTIFYs committed */
  uint64_t probes_received; /* counter: probes that came back (late ones included) */
  uint64_t probes_missed;   /* counter: probes not back within probe_timeout_ms
                               (each reported as KEEL_ENOTHEARING) */
  bool hearing;             /* gauge: the last probe came back in time (false before
                               the first one and after a miss) */
  double probe_lag_last_us; /* send → receipt of the last probe back, µs */
  double probe_lag_p50_us;  /* over every probe back */
  double probe_lag_p99_us;
  uint64_t reserved_[8]; /* ABI room: filled with zero */
} keel_listener_stats;

/* Fills *out (does nothing when l or out is NULL). Loop thread only. */
KEEL_EXTERN void keel_listener_get_stats(const keel_listener *l, keel_listener_stats *out);

/* Text of the last error (malformed payload, connection error, failed
 * LISTEN, refused argument, ...); "" when none. Valid until the next call
 * on l. Loop thread only. */
KEEL_EXTERN const char *keel_listener_last_error(const keel_listener *l);

/*
 * Closes the listener: disconnects, drops changes not yet delivered, and
 * calls cb (may be NULL; its object argument is the freed listener, for
 * identity only) on a later loop iteration, after which nothing else is
 * called and uv_loop_close() can succeed. No callback runs inside this
 * call. NULL-safe; a second call does nothing; callable from inside any of
 * the listener's callbacks (handler, on_gap, on_error, raw channel
 * callback). Loop thread only.
 */
KEEL_EXTERN void keel_listener_close(keel_listener *l, keel_close_cb cb, void *data);

struct keel_serve;

/*
 * Shows l on the keel_serve server s under name (keel/serve.h), as kind
 * "listener". The registration is dropped from s when l's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or l closing). Loop thread only.
 */
KEEL_EXTERN int keel_listener_serve(struct keel_serve *s, keel_listener *l, const char *name);

/*
 * Checks a channel name the way every listener and installer function does:
 * 1..63 bytes (PostgreSQL's NAMEDATALEN - 1), valid UTF-8, a letter, '_' or
 * a non-ASCII character first, then also digits and '$' (so no '.', blank
 * or quote). Case is kept: "Jobs" and "jobs" are two channels.
 * Returns 0 or UV_EINVAL with the reason written into why_buf (truncated to
 * why_cap; "" on success; why_buf may be NULL). Thread-safe.
 */
KEEL_EXTERN int keel_listener_validate_channel(const char *channel, char *why_buf, size_t why_cap);

/* ---- the trigger -------------------------------------------------------- */

/*
 * Writes into buf the SQL that installs keel's notify function (once per
 * database) and the trigger on `table` that notifies on `channel` (NULL =
 * default) with the primary-key columns `key_columns` (comma-separated,
 * e.g. "id" or "tenant_id,id"). Idempotent: running it twice is fine.
 * The triggers are named keel_notify_<table> and keel_notify_<table>_del;
 * when that would exceed 63 bytes the table part is cut on a character
 * boundary and followed by '_' and 8 hex digits of a hash of the name.
 * Returns the length; UV_EINVAL (NULL buf, bad table, channel or key
 * columns); UV_ENOMEM; UV_ENOBUFS (buf too small; its content is then
 * unspecified). Thread-safe.
 */
KEEL_EXTERN int keel_listener_install_sql(char *buf, size_t cap, const char *table,
                                          const char *key_columns, const char *channel);

typedef void (*keel_listener_install_cb)(keel_pg *conn, int status, void *data);

/*
 * Installs the trigger on `table` through conn (see keel_listener_install_sql).
 * key_columns NULL = the table's primary key, looked up first. cb (may be
 * NULL) is called once, on a later loop iteration, with 0 or the error
 * (KEEL_EPG with the message in keel_pg_last_error(conn), KEEL_ENOTFOUND
 * when the table has no primary key, or a status of keel_pg_query's
 * callback). Returns 0; UV_EINVAL (NULL conn or table, bad table or
 * channel) or UV_ENOMEM, or an error of keel_pg_query(); cb is called only
 * after 0. Loop thread only.
 */
KEEL_EXTERN int keel_listener_install(keel_pg *conn, const char *table, const char *key_columns,
                                      const char *channel, keel_listener_install_cb cb, void *data);

/*
 * Like keel_listener_install_sql(), and also pushes the subscription into
 * the trigger so that unwanted changes are never sent: only the operations
 * in `events` (a keel_change_op mask) fire it, and a `filter` (PostgREST
 * syntax, NULL = none) becomes its WHEN condition: with a filter, one trigger
 * per operation: INSERT tests the new row, DELETE the old row, UPDATE
 * either (so rows leaving or entering the filter are sent), as the listener
 * does (keel_change_filter_transition). The condition compares the row's
 * columns (NEW."col") with escape-string literals PostgreSQL reads as each
 * column's type, so the server's semantics decide, and text-like columns
 * order bytewise (COLLATE "C") like the listener's typed evaluator. A
 * column the table lacks or a literal its type cannot read makes the
 * install fail (keel_listener_install_filtered runs it as one DO block:
 * the table keeps its old triggers). The filter applies to everything the
 * table sends on that channel: installing again replaces the table's
 * triggers (one set per table).
 * Returns the length, UV_EINVAL (bad identifiers or channel, events
 * outside 1..7, a malformed filter), UV_ENOMEM or UV_ENOBUFS. Thread-safe.
 */
KEEL_EXTERN int keel_listener_install_filtered_sql(char *buf, size_t cap, const char *table,
                                                   const char *key_columns, const char *channel,
                                                   unsigned events, const char *filter);

/*
 * Installs the trigger of keel_listener_install_filtered_sql() through conn,
 * like keel_listener_install(). Returns 0, UV_EINVAL (also for a malformed
 * filter or events outside 1..7), UV_ENOMEM or an error of keel_pg_query();
 * cb is called only after 0. Loop thread only.
 */
KEEL_EXTERN int keel_listener_install_filtered(keel_pg *conn, const char *table,
                                               const char *key_columns, const char *channel,
                                               unsigned events, const char *filter,
                                               keel_listener_install_cb cb, void *data);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_LISTEN_H */
