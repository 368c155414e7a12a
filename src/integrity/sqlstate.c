/* SQLSTATE classes: what is worth retrying, and how. */
#include <string.h>

#include "keel/integrity.h"

keel_sqlstate_class keel_sqlstate_classify(const char *s) {
  if (s == NULL || strlen(s) != 5 || strcmp(s, "00000") == 0) return KEEL_SQLSTATE_NONE;
  if (strcmp(s, "40001") == 0 || strcmp(s, "40P01") == 0) return KEEL_SQLSTATE_RETRY_TX;
  if (strcmp(s, "55P03") == 0) return KEEL_SQLSTATE_RETRY;
  /* 08007 transaction resolution unknown: the COMMIT may have taken effect. */
  if (strcmp(s, "08007") == 0) return KEEL_SQLSTATE_IN_DOUBT;
  if (strncmp(s, "08", 2) == 0 || strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 ||
      strcmp(s, "57P03") == 0)
    return KEEL_SQLSTATE_CONNECTION;
  if (strcmp(s, "23505") == 0) return KEEL_SQLSTATE_UNIQUE;
  if (strncmp(s, "23", 2) == 0) return KEEL_SQLSTATE_CONSTRAINT;
  return KEEL_SQLSTATE_OTHER;
}

int keel_sqlstate_error(const char *s) {
  switch (keel_sqlstate_classify(s)) {
    case KEEL_SQLSTATE_NONE:
      return 0;
    case KEEL_SQLSTATE_RETRY_TX:
      return KEEL_ESERIALIZATION;
    case KEEL_SQLSTATE_RETRY:
      return KEEL_ERETRYABLE;
    case KEEL_SQLSTATE_CONNECTION:
      return KEEL_ECONN;
    case KEEL_SQLSTATE_UNIQUE:
      return KEEL_EUNIQUE;
    case KEEL_SQLSTATE_IN_DOUBT:
      return KEEL_EINDOUBT;
    default:
      return KEEL_EPG;
  }
}

int keel_sqlstate_map(int status, const keel_pg_result *res) {
  if (status != KEEL_EPG) return status;
  int mapped = keel_sqlstate_error(res != NULL ? keel_pg_result_sqlstate(res) : NULL);
  return mapped != 0 ? mapped : KEEL_EPG;
}

const char *keel_sqlstate_class_name(keel_sqlstate_class cls) {
  static const char *const names[KEEL_SQLSTATE_CLASS_COUNT] = {
      "none", "retry_tx", "retry", "connection", "unique", "constraint", "other", "in_doubt"};
  return (unsigned)cls < sizeof names / sizeof names[0] ? names[cls] : "unknown";
}

int keel_integrity_retryable(int status, void *classify_data) {
  /* KEEL_ECONN: certainly not applied, safe to resend. KEEL_EINDOUBT (may
   * have been applied) is never retried blindly: it is not listed. */
  if (status == KEEL_EUNIQUE) return classify_data != NULL && *(const bool *)classify_data;
  return status == KEEL_ESERIALIZATION || status == KEEL_ERETRYABLE || status == KEEL_ECONN ||
         status == UV_ETIMEDOUT;
}
