/* Scheduling: the interval timer, run requests, the pump that carries out
 * what the run's state machine (run.c) decides, the start and end of a
 * run, and its bound (run_timeout_ms). */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

static void kick_cb(uv_timer_t *t);
static void tick_cb(uv_timer_t *t);
static void runt_cb(uv_timer_t *t);

void keel__vkick(keel_verify *v) {
  if (!v->closing && v->ready) uv_timer_start(&v->kick, kick_cb, 0, 0);
}

int keel_verify_start(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  if (v->started) return 0;
  v->started = true;
  uv_timer_start(&v->tick, tick_cb, v->o.run_on_start ? 0 : v->o.interval_ms, v->o.interval_ms);
  return 0;
}

int keel_verify_stop(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  v->started = false;
  uv_timer_stop(&v->tick);
  if (v->run_requested) { /* requested, not begun: ends with UV_ECANCELED */
    v->run_requested = false;
    v->cancel_req = true;
    keel__vkick(v);
  }
  if (v->lock_inflight && !v->lock_cancel && !v->running) {
    v->lock_cancel = true;
    v->cancel_req = true;
    keel__vkick(v);
  }
  if (v->running) {
    v->stopping = true;
    keel__vkick(v);
  }
  /* no run needs the lease: another verifier may take over at once (a run
   * going gives it up when it ends) */
  if (v->lease && !v->running && !v->run_requested && (!v->lock_inflight || v->lock_cancel))
    keel__vlease_release(v);
  return 0;
}

static int request_run(keel_verify *v) {
  if (v->running || v->run_requested || (v->lock_inflight && !v->lock_cancel)) {
    v->st.runs_skipped++;
    return KEEL_EINPROGRESS;
  }
  v->run_requested = true;
  keel__vkick(v);
  return 0;
}

int keel_verify_run_now(keel_verify *v) {
  if (v == NULL) return UV_EINVAL;
  if (v->closing) return KEEL_ECLOSING;
  return request_run(v);
}

static void tick_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->started) (void)request_run(v);
}

static void kick_cb(uv_timer_t *t) {
  keel__vpump(t->data);
}

/* ---- the run ------------------------------------------------------------- */

void keel__vreport_run(keel_verify *v, int status) {
  uint64_t now = keel__vnow(v);
  if (!v->running) { /* ended before it began (leader lock, stop, close) */
    v->st.runs_started++;
    v->run_start = now;
    v->st.last_run_started_ms = now;
    v->run_rows = v->run_problems = 0;
  }
  uv_timer_stop(&v->runt);
  v->run_id++; /* statements of this run still out are dropped when they return */
  v->runq_out = false;
  uint64_t dur = now >= v->run_start ? now - v->run_start : 0;
  v->running = false;
  v->phase = KEEL__VPH_IDLE;
  v->stopping = false;
  v->st.last_run_duration_ms = dur;
  v->st.rows_last_run = v->run_rows;
  v->st.rows_per_s =
      dur > 0 ? (double)v->run_rows * 1000.0 / (double)dur : (double)v->run_rows * 1000.0;
  v->st.problems_last_run = v->run_problems;
  v->st.last_status = status;
  keel__vcodes_end_run(&v->codes);
  if (status == 0)
    v->st.runs_completed++;
  else
    v->st.runs_failed++;
  v->run_fence = 0;
  if (v->lease && !v->started && !v->run_requested) keel__vlease_release(v);
  if (v->o.on_run_done) v->o.on_run_done(v, status, v->o.data);
}

/* Ends the run: the checkpoint is cleared (completed) or saved (failed,
 * stopped) first, so that the next run sees it; then the run is reported. */
void keel__vend_run(keel_verify *v) {
  if (v->run_status == 0 && v->stopping) v->run_status = UV_ECANCELED;
  v->phase = KEEL__VPH_IDLE;
  if (keel__vckpt_end(v)) return; /* reported when the checkpoint is written */
  keel__vreport_run(v, v->run_status);
}

void keel__vfail_run(keel_verify *v, int status) {
  if (v->run_status == 0) v->run_status = status;
  v->scan_done = true;
  v->phase = KEEL__VPH_SCAN;
}

void keel__vbegin_run(keel_verify *v) {
  v->running = true;
  v->st.runs_started++;
  v->run_start = keel__vnow(v);
  v->st.last_run_started_ms = v->run_start;
  v->run_rows = v->run_problems = 0;
  v->run_status = 0;
  v->since_ckpt = 0;
  v->fetch_inflight = v->scan_done = v->have_last = v->have_bound = false;
  v->stopping = false;
  keel__vclear_keys(v->last);
  keel__vclear_keys(v->bound);
  if (v->colnames) {
    for (int i = 0; i < v->ncolnames; i++) keel__free(v->colnames[i]);
    keel__free(v->colnames);
    v->colnames = NULL;
    v->ncolnames = 0;
  }
  keel__vckpt_begin(v); /* then the largest key, then the batches */
}

/* ---- the run's bound ------------------------------------------------------ */

/* Ends the run now (timed out, connection lost): its statement still out is
 * dropped when it comes back (its ticket names an older run), fix-ups waiting are
 * dropped and running ones detached (their keel_verify_fix_done() returns
 * KEEL_ESTALE), the checkpoint is saved without waiting for it. */
void keel__vabort_run(keel_verify *v, int status) {
  if (!v->running) return;
  v->fetch_inflight = false;
  v->st.fixes_dropped += keel__vfix_drop_all(v);
  keel__vckpt_save_nowait(v);
  v->run_status = status;
  keel__vreport_run(v, status);
}

/* ": database unreachable (why)" when the connection c (NULL: the pool) is
 * down, else what the run waits for. */
static void wait_text(keel_verify *v, keel_pg *c, char *buf, size_t cap) {
  bool down = false;
  const char *err = "";
  if (c != NULL) {
    down = !keel_pg_is_connected(c);
    err = keel_pg_last_error(c);
  } else if (v->pool != NULL) {
    keel_pg_pool_stats ps;
    keel_pg_pool_get_stats(v->pool, &ps);
    down = ps.connected == 0;
    err = keel_pg_pool_last_error(v->pool);
  }
  if (down) {
    snprintf(buf, cap, ": database unreachable (%s)", err && *err ? err : "not connected");
  } else if (!v->running) {
    snprintf(buf, cap, " waiting for the leader lock");
  } else if (v->runq_out) {
    snprintf(buf, cap, " waiting for the database's answer (%s)",
             v->phase == KEEL__VPH_CKPT_CREATE || v->phase == KEEL__VPH_CKPT_LOAD ? "checkpoint"
             : v->phase == KEEL__VPH_BOUND                                        ? "largest key"
             : v->fetch_inflight                                                  ? "batch"
                                 : "end-of-run checkpoint");
  } else if (v->active.n > 0 || v->pending.n > 0 || v->wn > 0) {
    snprintf(buf, cap, " with %u fix-ups running and %u waiting", v->active.n,
             v->pending.n + v->wn);
  } else {
    buf[0] = '\0';
  }
}

static void runt_cb(uv_timer_t *t) {
  keel_verify *v = t->data;
  if (v->closing) return;
  char why[KEEL__ERRBUF_SIZE];
  unsigned long long ms = (unsigned long long)keel__vrun_timeout(v);
  if (!v->running) {
    if (!v->lock_inflight || v->lock_cancel) return;
    wait_text(v, v->lock_conn, why, sizeof why);
    v->lock_cancel = true;
    keel__vset_error(v, UV_ETIMEDOUT, "run timed out after %llu ms%s", ms, why);
    v->st.runs_timed_out++;
    keel__vreport_run(v, UV_ETIMEDOUT);
  } else {
    wait_text(v, v->conn, why, sizeof why);
    keel__vset_error(v, UV_ETIMEDOUT, "run timed out after %llu ms%s", ms, why);
    v->st.runs_timed_out++;
    keel__vabort_run(v, UV_ETIMEDOUT);
  }
  keel__vpump(v);
}

/* ---- the pump: whatever can move, moves --------------------------------- */

/* What run.c needs to decide. */
static keel__vview view(const keel_verify *v) {
  keel__vview s = {
      .closing = v->closing,
      .cancel_req = v->cancel_req,
      .run_requested = v->run_requested,
      .running = v->running,
      .lock_inflight = v->lock_inflight,
      .lock_cancel = v->lock_cancel,
      .has_fix = v->o.fix != NULL,
      .scanning = v->phase == KEEL__VPH_SCAN,
      .leader_lock = v->o.leader_lock,
      .leader = v->leader,
      .scan_done = v->scan_done,
      .stopping = v->stopping,
      .fetch_inflight = v->fetch_inflight,
      .fixes_active = v->active.n,
      .fixes_pending = v->pending.n,
      .fixes_waiting = v->wn,
      .fix_concurrency = v->o.fix_concurrency,
      .batch_size = v->o.batch_size,
  };
  /* the session that held the lock is gone (a new one may have come up) */
  s.lock_session_changed = v->o.leader_lock && !v->lease && v->leader && v->running &&
                           keel_pg_backend_pid(v->lock_conn) != v->lock_pid;
  return s;
}

void keel__vpump(keel_verify *v) {
  if (v->in_pump || v->closing) return;
  /* the lease's deadline passed while the loop was busy (or the process
   * stopped): no longer leader, before anything of the run moves on */
  if (v->lease && v->leader && uv_now(v->loop) >= v->lease_deadline) {
    keel__vlease_lost(v,
                      "leader lease lost: not renewed in time (local deadline: renewal sent + "
                      "leader_ttl_ms - leader_margin_ms)");
    if (v->closing) return;
  }
  v->in_pump = true;
  for (;;) {
    keel__vview s = view(v);
    switch (keel__vrun_next(&s)) {
      case KEEL__VA_NONE:
        goto out;
      case KEEL__VA_REPORT_CANCELED: /* stop dropped a requested run */
        v->cancel_req = false;
        keel__vset_error(v, UV_ECANCELED, "run cancelled by keel_verify_stop() before it began");
        keel__vreport_run(v, UV_ECANCELED);
        continue;
      case KEEL__VA_TAKE_REQUEST:
        v->run_requested = false;
        uv_timer_start(&v->runt, runt_cb, keel__vrun_timeout(v), 0);
        if (!v->o.leader_lock)
          keel__vbegin_run(v);
        else if (v->lock_inflight) /* a dropped run's request is still out: this run takes it over
                                    */
          v->lock_cancel = false;
        else
          keel__vlock_request(v);
        continue;
      case KEEL__VA_START_FIX:
        keel__vfix_start(v);
        continue;
      case KEEL__VA_LOSE_LEADER:
        v->leader = false;
        keel__vset_error(v, KEEL_ENOTLEADER, "leader lock connection lost");
        continue;
      case KEEL__VA_FAIL_NOT_LEADER:
        keel__vset_error(v, KEEL_ENOTLEADER, "lost the leader lock during the run");
        keel__vfail_run(v, KEEL_ENOTLEADER);
        continue;
      case KEEL__VA_FETCH:
        keel__vfetch(v);
        if (v->fetch_inflight) goto out;
        continue;
      case KEEL__VA_END_RUN:
        keel__vend_run(v);
        continue;
    }
  }
out:
  v->in_pump = false;
  keel__varm_fix_timer(v);
}
