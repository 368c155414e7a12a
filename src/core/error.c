#include <uv.h>

#include "keel/common.h"

const char *keel_strerror(int err) {
  if (err == 0) return "success";
  switch (err) {
#define KEEL_STRERROR_CASE_(name, value, msg) \
  case KEEL_##name:                           \
    return msg;
    KEEL_ERRNO_MAP(KEEL_STRERROR_CASE_)
#undef KEEL_STRERROR_CASE_
    default:
      break;
  }
  /* uv_strerror() allocates (and leaks) a message for codes it does not
   * know, so only ask it about codes in its list. */
  switch (err) {
#define KEEL_UV_STRERROR_CASE_(name, msg) \
  case UV_##name:                         \
    return uv_strerror(err);
    UV_ERRNO_MAP(KEEL_UV_STRERROR_CASE_)
#undef KEEL_UV_STRERROR_CASE_
    default:
      return "unknown error";
  }
}

const char *keel_err_name(int err) {
  if (err == 0) return "OK";
  switch (err) {
#define KEEL_ERR_NAME_CASE_(name, value, msg) \
  case KEEL_##name:                           \
    return "KEEL_" #name;
    KEEL_ERRNO_MAP(KEEL_ERR_NAME_CASE_)
#undef KEEL_ERR_NAME_CASE_
    default:
      break;
  }
  /* libuv's own list; uv_err_name() leaks memory for unknown codes, so only
   * ask it about codes it knows. */
  switch (err) {
#define KEEL_UV_NAME_CASE_(name, msg) \
  case UV_##name:                     \
    return "UV_" #name;
    UV_ERRNO_MAP(KEEL_UV_NAME_CASE_)
#undef KEEL_UV_NAME_CASE_
    default:
      return "UNKNOWN";
  }
}
