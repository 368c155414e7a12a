/* Per-problem-code counters of the verifier: a small table, linear lookup
 * with a last-hit hint (real validators name a handful of codes). */
#include <string.h>

#include "verify/verify_internal.h"

void keel__vcodes_init(keel__vcodes *c) {
  memset(c, 0, sizeof *c);
  memcpy(c->e[KEEL_VERIFY_MAX_CODES].code, "(other)", sizeof "(other)");
}

static bool same(const char *stored, const char *code) {
  return strncmp(stored, code, KEEL_VERIFY_CODE_MAX - 1) == 0;
}

void keel__vcodes_add(keel__vcodes *c, const char *code) {
  unsigned i = KEEL_VERIFY_MAX_CODES;
  if (c->hint < c->n && same(c->e[c->hint].code, code)) {
    i = c->hint;
  } else {
    for (unsigned j = 0; j < c->n; j++) {
      if (same(c->e[j].code, code)) {
        i = j;
        break;
      }
    }
    if (i == KEEL_VERIFY_MAX_CODES && c->n < KEEL_VERIFY_MAX_CODES) {
      i = c->n++;
      size_t len = strlen(code);
      if (len > KEEL_VERIFY_CODE_MAX - 1) len = KEEL_VERIFY_CODE_MAX - 1;
      memcpy(c->e[i].code, code, len);
      c->e[i].code[len] = '\0';
    }
  }
  if (i == KEEL_VERIFY_MAX_CODES)
    c->other_used = true;
  else
    c->hint = i;
  c->e[i].total++;
  c->run[i]++;
}

void keel__vcodes_end_run(keel__vcodes *c) {
  for (unsigned i = 0; i <= KEEL_VERIFY_MAX_CODES; i++) {
    c->e[i].last_run = c->run[i];
    c->run[i] = 0;
  }
}

unsigned keel__vcodes_top(const keel__vcodes *c, keel_verify_code_count *out, unsigned cap) {
  unsigned n = 0;
  const unsigned all = KEEL_VERIFY_MAX_CODES + 1;
  bool taken[KEEL_VERIFY_MAX_CODES + 1] = {false};
  while (n < cap) {
    unsigned best = all;
    for (unsigned i = 0; i < all; i++) {
      if (i >= c->n && i != KEEL_VERIFY_MAX_CODES) continue;
      if (i == KEEL_VERIFY_MAX_CODES && !c->other_used) continue;
      if (taken[i]) continue;
      if (best == all || c->e[i].total > c->e[best].total) best = i;
    }
    if (best == all) break;
    taken[best] = true;
    out[n++] = c->e[best];
  }
  return n;
}
