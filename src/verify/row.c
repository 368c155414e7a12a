/* Rows as the validator and the fix-ups see them: a row of a live batch
 * result, or a copy held by a fix-up. */
#include <string.h>

#include "core/util.h"
#include "verify/verify_internal.h"

int keel__vrow_find(const keel_verify_row *row, const char *name) {
  for (int i = 0; i < row->ncols; i++) {
    const char *n = row->names[i];
    if (n[0] == name[0] && strcmp(n, name) == 0) return i;
  }
  return -1;
}

const char *keel__vrow_val(const keel_verify_row *row, int i) {
  if (row->res) return keel_pg_result_value(row->res, row->idx, i);
  return row->values[i];
}

const char *keel_verify_row_get(const keel_verify_row *row, const char *name) {
  if (row == NULL || name == NULL) return NULL;
  int i = keel__vrow_find(row, name);
  return i < 0 ? NULL : keel__vrow_val(row, i);
}

bool keel_verify_row_is_null(const keel_verify_row *row, const char *name) {
  return keel_verify_row_get(row, name) == NULL;
}

bool keel_verify_row_has(const keel_verify_row *row, const char *name) {
  return row != NULL && name != NULL && keel__vrow_find(row, name) >= 0;
}

int keel_verify_row_ncols(const keel_verify_row *row) {
  return row ? row->ncols : 0;
}

const char *keel_verify_row_col_name(const keel_verify_row *row, int col) {
  if (row == NULL || col < 0 || col >= row->ncols) return NULL;
  return row->names[col];
}

const char *keel_verify_row_value(const keel_verify_row *row, int col) {
  if (row == NULL || col < 0 || col >= row->ncols) return NULL;
  return keel__vrow_val(row, col);
}

int keel_verify_row_key(const keel_verify_row *row, char *buf, size_t cap) {
  if (row == NULL || (buf == NULL && cap > 0)) return UV_EINVAL;
  size_t len = 0;
  for (int k = 0; k < row->nkeys; k++) {
    const char *s = keel__vrow_val(row, row->keycols[k]);
    if (s == NULL) s = "";
    for (const char *p = k ? "," : ""; *p; p++, len++)
      if (len + 1 < cap) buf[len] = *p;
    for (const char *p = s; *p; p++, len++)
      if (len + 1 < cap) buf[len] = *p;
  }
  if (cap > 0) buf[len < cap ? len : cap - 1] = '\0';
  return len > INT32_MAX ? INT32_MAX : (int)len;
}

int keel_verify_row_problem(const keel_verify_row *row, const char *code) {
  if (row == NULL || code == NULL || code[0] == '\0' || !row->in_validator || row->v == NULL)
    return UV_EINVAL;
  keel_verify_row *r = (keel_verify_row *)(uintptr_t)row;
  r->nproblems++;
  keel__vcodes_add(&row->v->codes, code);
  row->v->st.problems_total++;
  row->v->run_problems++;
  return 0;
}
