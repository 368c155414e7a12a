/* Private to src/pgqueue. */
#ifndef KEEL_PGQUEUE_INTERNAL_H
#define KEEL_PGQUEUE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "../core/alloc.h"
#include "keel/pgqueue.h"

typedef struct keel__pgq_sql {
  char *migrate;
  char *enqueue;
  char *fetch;
  char *finish;
  char *heartbeat;
  char *rescue;
  char *stats;
  char *cancel;
  char *redrive;
  char *notify_later;
} keel__pgq_sql;

int keel__pgq_sql_init(keel__pgq_sql *sql, const char *schema, long long migrate_key);
void keel__pgq_sql_free(keel__pgq_sql *sql);

/* A growable text buffer for statement parameters (array literals). */
typedef struct keel__pgq_buf {
  char *p;
  size_t len;
  size_t cap;
  int err;
} keel__pgq_buf;

void keel__pgq_buf_put(keel__pgq_buf *b, const char *s, size_t n);
void keel__pgq_buf_str(keel__pgq_buf *b, const char *s);
void keel__pgq_buf_fmt(keel__pgq_buf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Appends one element of a text[] literal: "quoted", or NULL for NULL. */
void keel__pgq_buf_elem(keel__pgq_buf *b, const char *s);
void keel__pgq_buf_free(keel__pgq_buf *b);

/* Name checks: 0 or UV_EINVAL. */
int keel__pgq_valid_queue(const char *s);
int keel__pgq_valid_schema(const char *s);
bool keel__pgq_valid_json(const char *s);

/* For bench/pgqueue.c (pickup split): wall-clock ns (CLOCK_REALTIME) of the
 * last NOTIFY received before the fetch that returned this job was sent
 * (0: none yet), of that fetch's sending, and of its answer. */
void keel__pgq_job_trace(const keel_pgqueue_job *job, uint64_t *notify_ns, uint64_t *sent_ns,
                         uint64_t *fetched_ns);

#endif
