/* Checkpoints: the table (created if missing), the key a run resumes
 * after, saved every checkpoint_every batches and when a run fails or is
 * stopped, cleared when a run completes. */
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

/* A fenced statement's answer (with a lease): false when the lease was
 * no longer held with the run's fence, so nothing was written. */
static bool refused(const keel_verify *v, int status, const keel_pg_result *res) {
  if (!v->lease || status < 0) return false;
  const char *held = keel_pg_result_value(res, 0, 0);
  return held == NULL || held[0] != 't';
}

static void ckpt_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  if (keel__vquery_returned(v)) return;
  if (status < 0) keel__vset_error(v, status, "checkpoint: %s", keel__vpg_error(v, c, res));
  if (refused(v, status, res)) {
    v->st.fenced_refused++;
    keel__vset_error(v, KEEL_ENOTLEADER, "checkpoint not written: the leader lease is gone");
  }
}

/* The end of a run: its checkpoint (cleared or saved) or, with a lease and
 * no checkpoint, the fenced check that it still leads. */
static void ckpt_end_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  if (status < 0) {
    keel__vset_error(v, status, "%s: %s", v->run_status == 0 ? "end of run" : "checkpoint",
                     keel__vpg_error(v, c, res));
    /* with a lease, a completed run whose end could not be fenced is not
     * reported as completed */
    if (v->lease && v->run_status == 0) v->run_status = status;
  }
  if (refused(v, status, res)) {
    v->st.fenced_refused++;
    bool ours = v->leader && v->fence == v->run_fence;
    keel__vset_error(v, KEEL_ENOTLEADER,
                     "run not committed: the leader lease was gone at its end (fence %s)",
                     v->run_fence_text);
    v->run_status = KEEL_ENOTLEADER;
    keel__vreport_run(v, v->run_status);
    if (!v->closing && ours && v->leader)
      keel__vlease_lost(v, "leader lease lost: a fenced write found it gone");
    keel__vkick(v);
    return;
  }
  keel__vreport_run(v, v->run_status);
  keel__vkick(v);
}

static void ckpt_load_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  if (status < 0) {
    keel__vset_error(v, status, "checkpoint load: %s", keel__vpg_error(v, c, res));
    keel__vfail_run(v, status);
    keel__vpump(v);
    return;
  }
  if (keel_pg_result_nrows(res) == 1) {
    int cols[KEEL_VERIFY_MAX_KEYS];
    for (int k = 0; k < v->nkeys; k++) cols[k] = k;
    if (keel__vcopy_keys(v->last, res, 0, cols, v->nkeys) == 0) {
      v->have_last = true;
      keel__vupdate_last_key(v);
    }
  }
  keel__vafter_checkpoint(v);
}

static void load_checkpoint(keel_verify *v) {
  v->phase = KEEL__VPH_CKPT_LOAD;
  const char *p[1] = {v->s_job};
  int rc = keel__vrunq(v, v->sql.ckpt_load, 1, p, ckpt_load_cb);
  if (rc < 0) {
    keel__vset_error(v, rc, "checkpoint load: %s", keel_strerror(rc));
    keel__vfail_run(v, rc);
  }
}

static void ckpt_create_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  const char *ss = res ? keel_pg_result_sqlstate(res) : NULL;
  /* concurrent CREATE TABLE IF NOT EXISTS may race: already there is fine */
  if (status < 0 && !(ss && (strcmp(ss, "23505") == 0 || strcmp(ss, "42P07") == 0))) {
    keel__vset_error(v, status, "checkpoint table: %s", keel__vpg_error(v, c, res));
    keel__vfail_run(v, status);
    keel__vpump(v);
    return;
  }
  v->ckpt_ready = true;
  load_checkpoint(v);
  keel__vpump(v);
}

void keel__vckpt_begin(keel_verify *v) {
  if (v->sql.ckpt_create == NULL) {
    keel__vafter_checkpoint(v);
  } else if (!v->ckpt_ready) {
    v->phase = KEEL__VPH_CKPT_CREATE;
    int rc = keel__vrunq(v, v->sql.ckpt_create, 0, NULL, ckpt_create_cb);
    if (rc < 0) {
      keel__vset_error(v, rc, "checkpoint table: %s", keel_strerror(rc));
      keel__vfail_run(v, rc);
    }
  } else {
    load_checkpoint(v);
  }
}

/* Parameters of a checkpoint save: job, keys, and with a lease the
 * fence's. Returns how many. */
static int save_params(keel_verify *v, const char **p) {
  int n = 0;
  p[n++] = v->s_job;
  for (int k = 0; k < v->nkeys; k++) p[n++] = v->last[k];
  if (v->lease) keel__vlease_params(v, p, &n, v->run_fence_text, sizeof v->run_fence_text);
  return n;
}

void keel__vckpt_batch_done(keel_verify *v) {
  if (v->sql.ckpt_save == NULL || !v->have_last || ++v->since_ckpt < v->o.checkpoint_every) return;
  v->since_ckpt = 0;
  const char *p[4 + KEEL_VERIFY_MAX_KEYS];
  int n = save_params(v, p);
  (void)keel__vquery(v, v->sql.ckpt_save, n, p, ckpt_cb);
}

bool keel__vckpt_end(keel_verify *v) {
  const char *p[4 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
  int n = 1;
  if (v->sql.ckpt_clear == NULL || !v->ckpt_ready) {
    if (!v->lease || v->run_status != 0) return false;
    n = 0;
    keel__vlease_params(v, p, &n, v->run_fence_text, sizeof v->run_fence_text);
    return keel__vrunq(v, v->sql.lease_check, n, p, ckpt_end_cb) == 0;
  }
  int rc = 1;
  if (v->run_status == 0) {
    if (v->lease) keel__vlease_params(v, p, &n, v->run_fence_text, sizeof v->run_fence_text);
    rc = keel__vrunq(v, v->sql.ckpt_clear, n, p, ckpt_end_cb);
  } else if (v->have_last) {
    n = save_params(v, p);
    rc = keel__vrunq(v, v->sql.ckpt_save, n, p, ckpt_end_cb);
  }
  return rc == 0;
}

void keel__vckpt_save_nowait(keel_verify *v) {
  if (v->sql.ckpt_save == NULL || !v->ckpt_ready || !v->have_last) return;
  const char *p[4 + KEEL_VERIFY_MAX_KEYS];
  int n = save_params(v, p);
  (void)keel__vquery(v, v->sql.ckpt_save, n, p, ckpt_cb);
}
