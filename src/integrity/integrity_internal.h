/* Private to src/integrity: the context and a small SQL text builder. */
#ifndef KEEL_INTEGRITY_INTERNAL_H
#define KEEL_INTEGRITY_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/util.h"
#include "keel/integrity.h"

struct occ_retry;
struct occ_shape;

/* Statement texts of versioned writes kept per spec shape (see occ.c). */
#define KEEL__OCC_SHAPES 8

struct keel_integrity {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_pg_pool *pool;
  keel_integrity_opts opts;
  keel_integrity_stats stats;
  unsigned outstanding; /* operations whose callback is still due */
  bool closing;
  keel_close_cb close_cb;
  void *close_data;
  struct occ_retry *mutating; /* the retry loop whose mutate runs now */
  uv_timer_t close_timer;     /* its close ends the context's close */
  char last_sqlstate[6];
  uint64_t random_fallback; /* counter used when the system's random source fails */
  char *idempotency_table;  /* copy of opts.idempotency_table (or the default) */
  /* The SQL of recent versioned-write shapes (occ.c): built once, then only
   * the values change per call. */
  struct occ_shape *occ_shapes[KEEL__OCC_SHAPES];
  unsigned occ_shape_next; /* slot replaced next */
  char last_error[KEEL__ERRBUF_SIZE];
};

/* A growing SQL buffer; `failed` sticks after an allocation failure. */
typedef struct keel__sql {
  char *text;
  size_t len, cap;
  bool failed;
} keel__sql;

/* 16 bytes from the system's random source; when it fails, the time and a
 * per-context counter, so that two calls never return the same bytes. */
void keel__ig_random16(keel_integrity *ig, unsigned char out[16]);

void keel__sql_add(keel__sql *b, const char *text);
/* Appends a quoted identifier; marks the builder failed when invalid. */
void keel__sql_ident(keel__sql *b, const char *ident, bool allow_qualified);
void keel__sql_addf(keel__sql *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void keel__sql_free(keel__sql *b);

/* Operation bookkeeping: begin counts an accepted operation (KEEL_ECLOSING
 * while closing); unbegin takes it back when the call then fails; end
 * counts a success and frees a closing context after its last operation. */
int keel__ig_begin(keel_integrity *ig);
void keel__ig_unbegin(keel_integrity *ig);
void keel__ig_end(keel_integrity *ig, int status);
/* Remembers the SQLSTATE of the last failure ("" for NULL). */
void keel__ig_set_sqlstate(keel_integrity *ig, const char *sqlstate);
/* Checks a retry policy; UV_EINVAL with text in last_error. */
int keel__ig_check_retry(keel_integrity *ig, const keel_retry_opts *ro);
/* Records an error result (by SQLSTATE class) and its text. */
void keel__ig_record_error(keel_integrity *ig, keel_pg *conn, int status,
                           const keel_pg_result *res);

/* Length of the longest prefix of s[0..len) of at most max bytes that ends
 * on a UTF-8 character boundary. */
size_t keel__utf8_prefix(const char *s, size_t len, size_t max);
/* A generated identifier of at most 63 bytes: prefix, at most max_part
 * bytes of part cut on a character boundary, "_" and the hash in hex.
 * 0 or UV_EINVAL (cap must exceed 63). */
int keel__ig_name(char *out, size_t cap, const char *prefix, const char *part, size_t max_part,
                  uint32_t hash);

/* What became of a transaction whose COMMIT was lost in flight, by its
 * pg_current_xact_id(): cb (on a later loop iteration) gets 0 (committed),
 * KEEL_ECONN (aborted: certainly not) or KEEL_EINDOUBT (unknown: too old,
 * still in progress after ~5 s, closing). Returns 0, KEEL_EINDOUBT (no
 * xid: cb not called) or UV_ENOMEM (cb not called). */
typedef void (*keel__xact_cb)(keel_integrity *ig, int outcome, void *data);
int keel__ig_xact_check(keel_integrity *ig, const char *xid, keel__xact_cb cb, void *data);
/* Frees the shapes occ.c kept (at the context's free). */
void keel__occ_shapes_free(keel_integrity *ig);

/* The statement that learns a transaction's id (pipelined first). */
#define KEEL__XID_SQL "SELECT pg_current_xact_id()::text"

#endif
