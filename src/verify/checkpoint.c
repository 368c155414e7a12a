/* Checkpoints: the table (created if missing), the key a run resumes
 * after, saved every checkpoint_every batches and when a run fails or is
 * stopped, cleared when a run completes. */
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

static void ckpt_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = data;
  if (keel__vquery_returned(v)) return;
  if (status < 0) keel__vset_error(v, status, "checkpoint: %s", keel__vpg_error(v, c, res));
}

static void ckpt_end_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  if (status < 0) keel__vset_error(v, status, "checkpoint: %s", keel__vpg_error(v, c, res));
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

void keel__vckpt_batch_done(keel_verify *v) {
  if (v->sql.ckpt_save == NULL || !v->have_last || ++v->since_ckpt < v->o.checkpoint_every) return;
  v->since_ckpt = 0;
  const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
  for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
  (void)keel__vquery(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_cb);
}

bool keel__vckpt_end(keel_verify *v) {
  if (v->sql.ckpt_clear == NULL || !v->ckpt_ready) return false;
  const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
  int rc = 1;
  if (v->run_status == 0) {
    rc = keel__vrunq(v, v->sql.ckpt_clear, 1, p, ckpt_end_cb);
  } else if (v->have_last) {
    for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
    rc = keel__vrunq(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_end_cb);
  }
  return rc == 0;
}

void keel__vckpt_save_nowait(keel_verify *v) {
  if (v->sql.ckpt_save == NULL || !v->ckpt_ready || !v->have_last) return;
  const char *p[1 + KEEL_VERIFY_MAX_KEYS] = {v->s_job};
  for (int k = 0; k < v->nkeys; k++) p[1 + k] = v->last[k];
  (void)keel__vquery(v, v->sql.ckpt_save, 1 + v->nkeys, p, ckpt_cb);
}
