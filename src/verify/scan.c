/* The keyset scan: the largest key (bounded runs), batches in key order
 * with the next one fetched while the current one is validated, and the
 * validator loop. */
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "core/util.h"
#include "verify/verify_internal.h"

static void batch_cb(keel_pg *c, int status, const keel_pg_result *res, void *data);

void keel__vclear_keys(char **keys) {
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS; k++) {
    keel__free(keys[k]);
    keys[k] = NULL;
  }
}

void keel__vupdate_last_key(keel_verify *v) {
  size_t len = 0;
  char *b = v->st.last_key;
  b[0] = '\0';
  for (int k = 0; k < v->nkeys && v->last[k]; k++) {
    int n = snprintf(b + len, sizeof v->st.last_key - len, "%s%s", k ? "," : "", v->last[k]);
    if (n < 0 || (size_t)n >= sizeof v->st.last_key - len) break;
    len += (size_t)n;
  }
}

void keel__vfetch(keel_verify *v) {
  const char *p[2 * KEEL_VERIFY_MAX_KEYS];
  int n = 0;
  if (v->have_last)
    for (int k = 0; k < v->nkeys; k++) p[n++] = v->last[k];
  if (v->sql.bounded)
    for (int k = 0; k < v->nkeys; k++) p[n++] = v->bound[k];
  int rc = keel__vrunq(v, v->have_last ? v->sql.batch_next : v->sql.batch_first, n, p, batch_cb);
  if (rc < 0) {
    keel__vset_error(v, rc, "batch query: %s", keel_strerror(rc));
    keel__vfail_run(v, rc);
    keel__vkick(v);
    return;
  }
  v->fetch_inflight = true;
}

int keel__vcopy_keys(char **dst, const keel_pg_result *res, int row, const int *cols, int nkeys) {
  char *tmp[KEEL_VERIFY_MAX_KEYS] = {NULL};
  for (int k = 0; k < nkeys; k++) {
    const char *s = keel_pg_result_value(res, row, cols[k]);
    if (s == NULL) {
      keel__vclear_keys(tmp);
      return UV_EINVAL;
    }
    tmp[k] = keel__strdup(s);
    if (tmp[k] == NULL) {
      keel__vclear_keys(tmp);
      return UV_ENOMEM;
    }
  }
  keel__vclear_keys(dst);
  for (int k = 0; k < nkeys; k++) dst[k] = tmp[k];
  return 0;
}

static void bound_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  if (status < 0) {
    keel__vset_error(v, status, "largest key: %s", keel__vpg_error(v, c, res));
    keel__vfail_run(v, status);
  } else if (keel_pg_result_nrows(res) == 0) {
    v->scan_done = true; /* empty table */
  } else {
    int cols[KEEL_VERIFY_MAX_KEYS];
    for (int k = 0; k < v->nkeys; k++) cols[k] = k;
    int rc = keel__vcopy_keys(v->bound, res, 0, cols, v->nkeys);
    if (rc < 0) {
      keel__vset_error(v, rc, "largest key: %s",
                       rc == UV_EINVAL ? "an id column is NULL" : "out of memory");
      keel__vfail_run(v, rc);
    }
    v->have_bound = true;
  }
  v->phase = KEEL__VPH_SCAN;
  keel__vpump(v);
}

void keel__vafter_checkpoint(keel_verify *v) {
  if (v->sql.bounded) {
    v->phase = KEEL__VPH_BOUND;
    int rc = keel__vrunq(v, v->sql.max_key, 0, NULL, bound_cb);
    if (rc < 0) {
      keel__vset_error(v, rc, "largest key: %s", keel_strerror(rc));
      keel__vfail_run(v, rc);
    }
  } else {
    v->phase = KEEL__VPH_SCAN;
  }
  keel__vpump(v);
}

static int build_colnames(keel_verify *v, const keel_pg_result *res) {
  int n = keel_pg_result_ncols(res);
  v->colnames = keel__calloc(n > 0 ? (size_t)n : 1, sizeof(char *));
  if (v->colnames == NULL) return UV_ENOMEM;
  for (int i = 0; i < n; i++) {
    const char *name = keel_pg_result_col_name(res, i);
    v->colnames[i] = keel__strdup(name ? name : "");
    if (v->colnames[i] == NULL) {
      for (int j = 0; j < i; j++) keel__free(v->colnames[j]);
      keel__free(v->colnames);
      v->colnames = NULL;
      return UV_ENOMEM;
    }
  }
  v->ncolnames = n;
  keel_verify_row r = {.ncols = n, .names = (const char *const *)v->colnames};
  for (int k = 0; k < v->nkeys; k++) {
    v->keycols[k] = keel__vrow_find(&r, v->s_keys[k]);
    if (v->keycols[k] < 0) return UV_EINVAL;
  }
  return 0;
}

static void batch_cb(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  keel_verify *v = keel__vrunq_back(data);
  if (v == NULL) return;
  v->fetch_inflight = false;
  if (!v->running) return;
  if (status < 0) {
    keel__vset_error(v, status, "batch query: %s", keel__vpg_error(v, c, res));
    keel__vfail_run(v, status);
    keel__vpump(v);
    return;
  }
  v->st.batches++;
  int nrows = keel_pg_result_nrows(res);
  if (v->colnames == NULL) {
    int rc = build_colnames(v, res);
    if (rc < 0) {
      keel__vset_error(
          v, rc, "%s",
          rc == UV_ENOMEM ? "out of memory" : "an id column is missing from the result");
      keel__vfail_run(v, rc);
      keel__vpump(v);
      return;
    }
  }
  if (nrows > 0) {
    int rc = keel__vcopy_keys(v->last, res, nrows - 1, v->keycols, v->nkeys);
    if (rc < 0) {
      keel__vset_error(
          v, rc, "%s",
          rc == UV_EINVAL ? "an id column is NULL: ids must be NOT NULL" : "out of memory");
      keel__vfail_run(v, rc);
      keel__vpump(v);
      return;
    }
    v->have_last = true;
    keel__vupdate_last_key(v);
  }
  if ((uint32_t)nrows < v->o.batch_size) v->scan_done = true;
  /* Prefetch: the next batch travels while this one is validated. */
  else if (!v->stopping && v->pending.n < v->o.batch_size && v->leader && v->run_status == 0 &&
           !v->closing)
    keel__vfetch(v);

  keel_verify_row row = {.v = v,
                         .ncols = v->ncolnames,
                         .names = (const char *const *)v->colnames,
                         .res = res,
                         .keycols = v->keycols,
                         .nkeys = v->nkeys,
                         .in_validator = true};
  keel_verify_validate_fn validate = v->o.validate;
  void *udata = v->o.data;
  for (int i = 0; i < nrows; i++) {
    row.idx = i;
    row.nproblems = 0;
    bool ok = validate(v, &row, udata);
    if (v->closing) return;
    v->st.rows_scanned++;
    v->run_rows++;
    if (ok && row.nproblems == 0) {
      v->st.rows_valid++;
      continue;
    }
    v->st.rows_invalid++;
    if (row.nproblems == 0) {
      keel__vcodes_add(&v->codes, "invalid");
      v->st.problems_total++;
      v->run_problems++;
    }
    if (v->o.fix == NULL) continue;
    row.in_validator = false;
    keel_verify_fix *f = keel__vfix_new(&row);
    row.in_validator = true;
    if (f == NULL) {
      v->st.fixes_failed++;
      keel__vset_error(v, UV_ENOMEM, "out of memory copying an invalid row for its fix-up");
      continue;
    }
    f->v = v;
    f->fence = v->run_fence;
    f->attempt = 1;
    keel__vq_push(&v->pending, f);
  }
  keel__vckpt_batch_done(v);
  keel__vpump(v);
}
