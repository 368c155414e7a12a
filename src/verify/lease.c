/* Leader election by lease (KEEL_VERIFY_LEADER_LEASE): a row in a table
 * keel creates, taken or renewed with one INSERT ... ON CONFLICT DO UPDATE
 * statement (River's leader table). Nothing rests on session state, so it
 * holds through transaction poolers, dropped connections and reconnects:
 *
 * - the lease expires by the server's clock, ttl after each renewal; it is
 *   taken over only once expired, and every takeover raises the fence;
 * - the leader renews every ttl / 3 and stops considering itself leader at
 *   renewal send time + ttl - margin (its own clock, read before the
 *   statement was sent), before the lease can expire on the server;
 * - a run begins only after an answer that says this verifier holds the
 *   lease, under that fence; the run's checkpoint writes and its end are
 *   fenced statements (they take effect only while the lease is held with
 *   that fence), and fix-ups get the fence (keel_verify_fix_fence_sql).
 *
 * Statements go on the verifier's own leader connection (conninfo) or
 * through the pool. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

static uint64_t lease_ttl(const keel_verify *v) {
  return v->o.leader_ttl_ms ? v->o.leader_ttl_ms : 10000;
}

static uint64_t lease_margin(const keel_verify *v) {
  return v->o.leader_margin_ms ? v->o.leader_margin_ms : lease_ttl(v) / 5;
}

static int lease_query(keel_verify *v, const char *sql, int n, const char *const *p,
                       keel_pg_result_cb cb, void *data) {
  int rc = v->lock_conn ? keel_pg_query(v->lock_conn, sql, n, p, cb, data)
                        : keel_pg_pool_query(v->pool, sql, n, p, cb, data);
  if (rc == 0) v->queries_out++;
  return rc;
}

static void deadline_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->closing || !v->leader) return;
  keel__vlease_lost(v,
                    "leader lease lost: not renewed in time (local deadline: renewal sent + "
                    "leader_ttl_ms - leader_margin_ms)");
}

void keel__vlease_lost(keel_verify *v, const char *why) {
  bool was = v->leader;
  v->leader = false;
  v->fence = 0;
  v->fence_text[0] = '\0';
  uv_timer_stop(&v->renewt);
  uv_timer_stop(&v->deadt);
  if (was) v->st.leases_lost++;
  keel__vset_error(v, KEEL_ENOTLEADER, "%s", why);
  if (v->running) keel__vabort_run(v, KEEL_ENOTLEADER);
  keel__vkick(v);
}

static int send_acquire(keel_verify *v);

static void renew_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->closing || !v->leader) return;
  if (!v->started && !v->running && !v->lock_inflight && !v->run_requested) {
    keel__vlease_release(v); /* no run needs it: let another take over at once */
    return;
  }
  if (!v->renew_inflight) (void)send_acquire(v);
}

/* An answer says this verifier holds the lease with `fence`, for a
 * statement sent at loop time `sent`. */
static void held(keel_verify *v, uint64_t fence, uint64_t sent) {
  uint64_t ttl = lease_ttl(v);
  uint64_t deadline = sent + ttl - lease_margin(v);
  if (!v->leader || v->fence != fence) {
    if (v->leader) v->st.leases_lost++; /* expired and taken again: a new fence */
    v->st.leader_changes++;
    v->leader = true;
    v->fence = fence;
    snprintf(v->fence_text, sizeof v->fence_text, "%" PRIu64, fence);
    v->lease_deadline = deadline;
    if (v->running && v->run_fence != fence) {
      keel__vset_error(v, KEEL_ENOTLEADER, "leader lease expired during the run (new fence)");
      keel__vabort_run(v, KEEL_ENOTLEADER);
      if (v->closing) return;
    }
  } else if (deadline > v->lease_deadline) {
    v->lease_deadline = deadline;
  }
  uint64_t now = uv_now(v->loop);
  if (v->lease_deadline <= now) {
    keel__vlease_lost(v, "leader lease lost: its renewal came back after the local deadline");
    return;
  }
  uv_timer_start(&v->deadt, deadline_cb, v->lease_deadline - now, 0);
  if (!uv_is_active((uv_handle_t *)&v->renewt)) {
    uint64_t every = ttl / 3 > 0 ? ttl / 3 : 1;
    uv_timer_start(&v->renewt, renew_cb, every, every);
  }
}

/* The answer to a run's request failed: the run ends with it. */
static void request_failed(keel_verify *v, int status) {
  if (!v->lock_inflight) return;
  v->lock_inflight = false;
  if (v->lock_cancel) { /* the run already ended (stop, timeout, lost connection) */
    v->lock_cancel = false;
    return;
  }
  keel__vreport_run(v, status);
}

typedef struct lease_req {
  keel_verify *v;
  uint64_t sent;
} lease_req;

static void acquire_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  lease_req *r = data;
  keel_verify *v = r->v;
  uint64_t sent = r->sent;
  keel__free(r);
  v->renew_inflight = false;
  if (v->closing && status == 0 && keel_pg_result_nrows(res) == 1 && v->lock_conn == NULL) {
    /* Taken or renewed after close began (close's release may even have
     * run first): give it back, or the others wait out its ttl. Through
     * the pool, which outlives the verifier; nobody waits for it. */
    const char *fence = keel_pg_result_value(res, 0, 0);
    const char *p[3] = {v->s_job, v->owner, fence};
    if (fence != NULL) (void)keel_pg_pool_query(v->pool, v->sql.lease_release, 3, p, NULL, NULL);
  }
  if (keel__vquery_returned(v)) return;
  if (status < 0) {
    /* the lease stays ours until its deadline: the next renewal may pass */
    keel__vset_error(v, status, "leader lease: %s", keel__vpg_error(v, c, res));
    request_failed(v, status);
    keel__vkick(v);
    return;
  }
  if (keel_pg_result_nrows(res) == 1) {
    const char *text = keel_pg_result_value(res, 0, 0);
    uint64_t fence = text ? strtoull(text, NULL, 10) : 0;
    held(v, fence, sent);
    if (v->closing) return;
  } else if (v->leader) {
    keel__vlease_lost(v, "leader lease lost: taken over by another verifier");
    if (v->closing) return;
  }
  if (v->lock_inflight) { /* a run waits for this answer */
    v->lock_inflight = false;
    if (v->lock_cancel) {
      v->lock_cancel = false;
    } else if (!v->leader) {
      uv_timer_stop(&v->runt);
      v->st.runs_not_leader++;
    } else {
      v->run_fence = v->fence;
      keel__vbegin_run(v);
      keel__vpump(v);
      return;
    }
  }
  if (v->leader && !v->started && !v->running && !v->run_requested) keel__vlease_release(v);
  keel__vkick(v);
}

static void create_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  v->renew_inflight = false;
  v->lease_creating = false;
  if (keel__vquery_returned(v)) return;
  const char *ss = res ? keel_pg_result_sqlstate(res) : NULL;
  /* concurrent CREATE TABLE IF NOT EXISTS may race: already there is fine */
  if (status < 0 && !(ss && (strcmp(ss, "23505") == 0 || strcmp(ss, "42P07") == 0))) {
    keel__vset_error(v, status, "leader lease table: %s", keel__vpg_error(v, c, res));
    request_failed(v, status);
    keel__vkick(v);
    return;
  }
  v->lease_ready = true;
  int rc = send_acquire(v);
  if (rc < 0) {
    keel__vset_error(v, rc, "leader lease: %s", keel_strerror(rc));
    request_failed(v, rc);
    keel__vkick(v);
  }
}

/* Sends the acquire-or-renew statement (the table first, once). */
static int send_acquire(keel_verify *v) {
  if (v->renew_inflight) return 0;
  if (!v->lease_ready) {
    int rc = lease_query(v, v->sql.lease_create, 0, NULL, create_cb, v);
    if (rc == 0) v->renew_inflight = v->lease_creating = true;
    return rc;
  }
  lease_req *r = keel__malloc(sizeof *r);
  if (r == NULL) return UV_ENOMEM;
  r->v = v;
  r->sent = uv_now(v->loop); /* at or before the send: the deadline errs early */
  char ttl[24];
  snprintf(ttl, sizeof ttl, "%" PRIu64, lease_ttl(v));
  const char *p[3] = {v->s_job, v->owner, ttl};
  int rc = lease_query(v, v->sql.lease_acquire, 3, p, acquire_cb, r);
  if (rc < 0) {
    keel__free(r);
    return rc;
  }
  v->renew_inflight = true;
  return 0;
}

void keel__vlease_request(keel_verify *v) {
  v->lock_inflight = true;
  v->lock_cancel = false;
  int rc = send_acquire(v);
  if (rc < 0) {
    keel__vset_error(v, rc, "leader lease: %s", keel_strerror(rc));
    request_failed(v, rc);
  }
}

static void release_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)status, (void)res;
  keel_verify *v = data;
  v->releasing = false;
  /* at close: the leader connection waited for this statement */
  if (v->closing && c == v->lock_conn) keel_pg_close(v->lock_conn, keel__von_conn_closed, v);
  (void)keel__vquery_returned(v);
}

void keel__vlease_release(keel_verify *v) {
  if (!v->leader) return;
  const char *p[3] = {v->s_job, v->owner, v->fence_text};
  if (v->lock_conn != NULL) {
    if (keel_pg_query(v->lock_conn, v->sql.lease_release, 3, p, release_cb, v) == 0) {
      v->queries_out++;
      v->releasing = true;
    }
  } else {
    /* through the pool, which outlives the verifier: nobody waits for it */
    (void)keel_pg_pool_query(v->pool, v->sql.lease_release, 3, p, NULL, NULL);
  }
  v->leader = false;
  v->fence = 0;
  v->fence_text[0] = '\0';
  uv_timer_stop(&v->renewt);
  uv_timer_stop(&v->deadt);
}

void keel__vlease_params(keel_verify *v, const char **p, int *n, char *fence_text, size_t cap) {
  snprintf(fence_text, cap, "%" PRIu64, v->run_fence);
  p[(*n)++] = v->s_job;
  p[(*n)++] = v->owner;
  p[(*n)++] = fence_text;
}

static size_t put(char *buf, size_t cap, size_t at, const char *s) {
  size_t n = strlen(s);
  if (at < cap) {
    size_t room = cap - at - 1;
    memcpy(buf + at, s, n < room ? n : room);
  }
  return at + n;
}

/* An escape-string literal: E'...' with ' and \ doubled. */
static size_t put_literal(char *buf, size_t cap, size_t at, const char *s) {
  at = put(buf, cap, at, "E'");
  for (const char *q = s; *q; q++) {
    char one[3] = {*q, '\0', '\0'};
    if (*q == '\'' || *q == '\\') one[1] = *q;
    at = put(buf, cap, at, one);
  }
  return put(buf, cap, at, "'");
}

int keel__vlease_fence_sql(const keel_verify *v, uint64_t fence, char *buf, size_t cap) {
  size_t at = 0;
  if (v == NULL) {
    at = put(buf, cap, 0, "false"); /* detached */
  } else if (!v->lease) {
    at = put(buf, cap, 0, "true");
  } else if (fence == 0) {
    at = put(buf, cap, 0, "false");
  } else {
    char quoted[140], num[24];
    if (keel_pg_quote_ident(
            quoted, sizeof quoted,
            v->o.leader_table ? v->o.leader_table : KEEL_VERIFY_DEFAULT_LEADER_TABLE, true) < 0)
      return UV_EINVAL;
    snprintf(num, sizeof num, "%" PRIu64, fence);
    at = put(buf, cap, at, "EXISTS (SELECT 1 FROM ");
    at = put(buf, cap, at, quoted);
    at = put(buf, cap, at, " keel_lease WHERE keel_lease.name = ");
    at = put_literal(buf, cap, at, v->s_job);
    at = put(buf, cap, at, " AND keel_lease.owner = ");
    at = put_literal(buf, cap, at, v->owner);
    at = put(buf, cap, at, " AND keel_lease.fence = ");
    at = put(buf, cap, at, num);
    at = put(buf, cap, at,
             " AND keel_lease.expires_at > pg_catalog.clock_timestamp() FOR SHARE OF "
             "keel_lease)");
  }
  if (cap > 0) buf[at < cap ? at : cap - 1] = '\0';
  return at > (size_t)INT32_MAX ? UV_E2BIG : (int)at;
}
