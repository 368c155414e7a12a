/* Leader election: a session-level advisory lock asked for on a dedicated
 * connection (owned, or held from the pool) before each run. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

void keel__von_lock_state(keel_pg *c, bool up, int status, void *data) {
  keel_verify *v = data;
  if (up || v->closing) return;
  /* a lease lives in its table, not in the session: it stays until its
   * deadline (a renewal on the next session may keep it) */
  if (v->leader && !v->lease)
    keel__vset_error(v, status, "leader lock connection lost: %s", keel_pg_last_error(c));
  if (!v->lease) v->leader = false;
  if (v->lock_inflight && !v->lock_cancel && !v->running) {
    /* waiting for the lock: the run ends now (the lock query is dropped when
     * it comes back) */
    v->lock_cancel = true;
    status = status == KEEL_EAUTH || status == KEEL_ENODB ? status : KEEL_ECONN;
    keel__vset_error(v, status, "leader lock: database unreachable (%s)", keel_pg_last_error(c));
    keel__vreport_run(v, status);
  }
  keel__vkick(v);
}

static void lock_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  v->lock_inflight = false;
  if (keel__vquery_returned(v)) return;
  if (status < 0) {
    v->leader = false;
    if (v->lock_cancel) { /* the run already ended (stop, timeout, lost connection) */
      v->lock_cancel = false;
      keel__vkick(v);
      return;
    }
    keel__vset_error(v, status, "leader lock: %s", keel__vpg_error(v, c, res));
    keel__vreport_run(v, status);
    keel__vkick(v);
    return;
  }
  const char *val = keel_pg_result_value(res, 0, 0);
  v->leader = val != NULL && val[0] == 't';
  v->lock_pid = v->leader ? keel_pg_backend_pid(v->lock_conn) : 0;
  if (v->lock_cancel) { /* the run already ended meanwhile */
    v->lock_cancel = false;
    keel__vkick(v);
    return;
  }
  if (!v->leader) {
    uv_timer_stop(&v->runt);
    v->st.runs_not_leader++;
    return;
  }
  keel__vbegin_run(v);
  keel__vpump(v);
}

static void lock_acquired(keel_pg_pool *pool, keel_pg *conn, int status, void *data) {
  keel_verify *v = data;
  v->lock_acquiring = false;
  v->lock_inflight = false;
  v->queries_out--;
  if (v->closing) {
    if (status == 0) keel_pg_pool_release(pool, conn);
    keel__vmaybe_free(v);
    return;
  }
  if (v->lock_cancel) { /* the run already ended meanwhile */
    v->lock_cancel = false;
    if (status == 0) v->lock_conn = conn;
    keel__vkick(v);
    return;
  }
  if (status < 0) {
    keel__vset_error(v, status, "leader lock: no pool connection (%s)", keel_err_name(status));
    keel__vreport_run(v, status);
    keel__vkick(v);
    return;
  }
  v->lock_conn = conn;
  keel__vlock_request(v);
}

/* Asks for the advisory lock on the dedicated connection (taking one from
 * the pool first when there is no conninfo). */
void keel__vlock_request(keel_verify *v) {
  if (v->lease) {
    keel__vlease_request(v);
    return;
  }
  if (v->lock_conn == NULL) {
    if (v->lock_acquiring) return;
    int rc = keel_pg_pool_acquire(v->pool, lock_acquired, v);
    if (rc < 0) {
      keel__vset_error(v, rc, "leader lock: %s", keel_strerror(rc));
      keel__vreport_run(v, rc);
      return;
    }
    v->queries_out++;
    v->lock_acquiring = true;
    v->lock_inflight = true;
    return;
  }
  char key[32];
  snprintf(key, sizeof key, "%" PRId64, v->o.leader_lock_key);
  const char *p[1] = {key};
  int rc = keel_pg_query(v->lock_conn, v->sql.lock, 1, p, lock_cb, v);
  if (rc == 0) {
    v->queries_out++;
    v->lock_inflight = true;
  } else {
    keel__vset_error(v, rc, "leader lock: %s", keel_strerror(rc));
    keel__vreport_run(v, rc);
  }
}

void keel__vlock_release(keel_verify *v) {
  if (v->lock_conn == NULL || !v->lock_from_pool) return;
  /* the pooled session must not keep our lock: unlock, then give it back
   * (statements queued on it finish first) */
  char key[32];
  snprintf(key, sizeof key, "%" PRId64, v->o.leader_lock_key);
  const char *p[1] = {key};
  if (v->leader || v->lock_inflight)
    (void)keel_pg_query(v->lock_conn, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", 1, p,
                        NULL, NULL);
  keel_pg_pool_release(v->pool, v->lock_conn);
  v->lock_conn = NULL;
}
