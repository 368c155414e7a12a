/* Shared fixture of the durable queue suites: one schema per test (so
 * parallel tests never share a table), a worker in this process, and
 * helpers for forked worker processes. */
#ifndef KT_PGQUEUE_COMMON_H
#define KT_PGQUEUE_COMMON_H

#include <criterion/criterion.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keel/pgqueue.h"
#include "support/harness.h"

typedef struct fx {
  uv_loop_t loop;
  char schema[64];
  const char *conninfo;
  keel_pgqueue *q;
  keel_pgqueue_opts o;
  bool ready;
  int ready_status;
  bool closed;
  /* what the process function saw */
  int started;
  int fail_first; /* attempts that fail before success */
  bool hold;      /* do not call done */
  keel_pgqueue_job *held[64];
  int nheld;
  int64_t order[4096];
  int norder;
  int lost;
  /* enqueue results */
  int enq_done;
  int enq_status;
  keel_pgqueue_enqueued enq[1024];
  size_t nenq;
} fx;

static inline void fx_process(keel_pgqueue *q, keel_pgqueue_job *job, void *data) {
  (void)q;
  fx *f = data;
  f->started++;
  if (f->norder < 4096) f->order[f->norder++] = keel_pgqueue_job_id(job);
  if (f->hold) {
    if (f->nheld < 64) f->held[f->nheld++] = job;
    return;
  }
  if ((int)keel_pgqueue_job_attempt(job) <= f->fail_first) {
    keel_pgqueue_job_fail(job, KEEL_ERETRYABLE, "planned failure");
    return;
  }
  keel_pgqueue_job_done(job, 0);
}

static inline void fx_ready(keel_pgqueue *q, int status, void *data) {
  (void)q;
  fx *f = data;
  f->ready = true;
  f->ready_status = status;
}

static inline void fx_lost(keel_pgqueue *q, keel_pgqueue_job *job, int64_t id, unsigned attempt,
                           void *data) {
  (void)q, (void)job, (void)id, (void)attempt;
  ((fx *)data)->lost++;
}

static inline void fx_init(fx *f, const char *prefix, const char *conninfo) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  kt_unique_name(f->schema, sizeof f->schema, prefix);
  f->conninfo = conninfo ? conninfo : kt_pg_conninfo();
  keel_pgqueue_opts_init(&f->o);
  f->o.conninfo = f->conninfo;
  f->o.schema = f->schema;
  f->o.queue = "q1";
  f->o.process = fx_process;
  f->o.on_ready = fx_ready;
  f->o.on_lease_lost = fx_lost;
  f->o.data = f;
  f->o.poll_ms = 100;
  f->o.done_retention_ms = 3600000; /* keep done rows to count them */
  f->o.stats_ms = 0;
}

static inline bool fx_is_ready(void *ctx) {
  return ((fx *)ctx)->ready;
}
static inline bool fx_is_closed(void *ctx) {
  return ((fx *)ctx)->closed;
}
static inline bool fx_enq_done(void *ctx) {
  return ((fx *)ctx)->enq_done > 0;
}

static inline void fx_start(fx *f) {
  char why[256];
  int rc = keel_pgqueue_new_ex(&f->loop, &f->o, &f->q, why, sizeof why);
  cr_assert_eq(rc, 0, "new: %s", why);
  cr_assert(kt_wait_for(&f->loop, fx_is_ready, f, 15000), "not ready");
  cr_assert_eq(f->ready_status, 0, "migration: %s", keel_pgqueue_last_error(f->q));
}

static inline void fx_on_closed(void *obj, void *data) {
  (void)obj;
  ((fx *)data)->closed = true;
}

static inline void fx_finish(fx *f) {
  if (f->q) {
    keel_pgqueue_close(f->q, fx_on_closed, f);
    uv_update_time(&f->loop);
    cr_expect(kt_wait_for(&f->loop, fx_is_closed, f, 10000), "close callback not called");
    f->q = NULL;
  }
  kt_loop_finish(&f->loop);
}

static inline void fx_drop(fx *f) {
  kt_pg_execf("DROP SCHEMA IF EXISTS %s CASCADE", f->schema);
}

static inline void fx_enq_cb(keel_pgqueue *q, int status, const keel_pgqueue_enqueued *jobs,
                             size_t n, void *data) {
  (void)q;
  fx *f = data;
  f->enq_done++;
  f->enq_status = status;
  if (status == 0) {
    for (size_t i = 0; i < n && f->nenq < 1024; i++) f->enq[f->nenq++] = jobs[i];
  }
}

/* Enqueues and waits for the outcome; returns its status. */
static inline int fx_enqueue(fx *f, const keel_pgqueue_job_opts *jobs, size_t n) {
  f->enq_done = 0;
  int rc = keel_pgqueue_enqueue(f->q, NULL, jobs, n, fx_enq_cb, f);
  if (rc != 0) return rc;
  uv_update_time(&f->loop); /* after blocking set-up calls: the guard counts from now */
  cr_assert(kt_wait_for(&f->loop, fx_enq_done, f, 15000), "enqueue callback not called");
  return f->enq_status;
}

static inline long fx_count(fx *f, const char *where) {
  char *v = kt_pg_scalarf("SELECT count(*) FROM %s.pgqueue_jobs WHERE %s", f->schema, where);
  long n = v ? strtol(v, NULL, 10) : -1;
  free(v);
  return n;
}

#endif
