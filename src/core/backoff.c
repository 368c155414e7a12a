#include <math.h>

#include "keel/retry.h"

/* splitmix64: turns any seed (0 included) into a well-mixed state. */
static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void keel_rng_seed(keel_rng *rng, uint64_t seed) {
  if (rng == NULL) return;
  rng->state[0] = splitmix64(&seed);
  rng->state[1] = splitmix64(&seed);
  if (rng->state[0] == 0 && rng->state[1] == 0) rng->state[1] = 1;
}

/* xoroshiro128+ (Blackman and Vigna, 2018 parameters 24, 16, 37). */
uint64_t keel_rng_next(keel_rng *rng) {
  if (rng == NULL) return 0;
  uint64_t s0 = rng->state[0];
  uint64_t s1 = rng->state[1];
  uint64_t result = s0 + s1;
  s1 ^= s0;
  rng->state[0] = ((s0 << 24) | (s0 >> 40)) ^ s1 ^ (s1 << 16);
  rng->state[1] = (s1 << 37) | (s1 >> 27);
  return result;
}

uint64_t keel_rng_between(keel_rng *rng, uint64_t low, uint64_t high) {
  if (rng == NULL || high <= low) return low;
  uint64_t span = high - low;
  if (span == UINT64_MAX) return keel_rng_next(rng);
  span += 1;
  /* Rejection sampling keeps the draw unbiased: accept only draws below the
   * largest multiple of span that fits. */
  uint64_t limit = UINT64_MAX - (UINT64_MAX % span);
  uint64_t draw;
  do draw = keel_rng_next(rng);
  while (draw >= limit);
  return low + draw % span;
}

void keel_backoff_fixed(keel_backoff *b, uint64_t delay_ms) {
  if (b == NULL) return;
  b->kind = KEEL_BACKOFF_FIXED;
  b->base_ms = delay_ms;
  b->factor = 1.0;
  b->max_ms = 0;
}

void keel_backoff_exponential(keel_backoff *b, uint64_t base_ms, double factor, uint64_t max_ms) {
  if (b == NULL) return;
  b->kind = KEEL_BACKOFF_EXPONENTIAL;
  b->base_ms = base_ms;
  b->factor = factor;
  b->max_ms = max_ms;
}

void keel_backoff_full_jitter(keel_backoff *b, uint64_t base_ms, double factor, uint64_t max_ms) {
  if (b == NULL) return;
  keel_backoff_exponential(b, base_ms, factor, max_ms);
  b->kind = KEEL_BACKOFF_FULL_JITTER;
}

void keel_backoff_decorrelated_jitter(keel_backoff *b, uint64_t base_ms, uint64_t max_ms) {
  if (b == NULL) return;
  b->kind = KEEL_BACKOFF_DECORRELATED_JITTER;
  b->base_ms = base_ms;
  b->factor = 3.0; /* informative only: the AWS formula's multiplier */
  b->max_ms = max_ms;
}

void keel_backoff_linear(keel_backoff *b, uint64_t base_ms, uint64_t max_ms) {
  if (b == NULL) return;
  b->kind = KEEL_BACKOFF_LINEAR;
  b->base_ms = base_ms;
  b->factor = 1.0;
  b->max_ms = max_ms;
}

int keel_backoff_validate(const keel_backoff *b, const char **why) {
  const char *problem = NULL;
  if (b == NULL)
    problem = "backoff policy is NULL";
  else if (b->kind < KEEL_BACKOFF_FIXED || b->kind > KEEL_BACKOFF_LINEAR)
    problem = "unknown backoff kind";
  else if ((b->kind == KEEL_BACKOFF_EXPONENTIAL || b->kind == KEEL_BACKOFF_FULL_JITTER) &&
           (!isfinite(b->factor) || b->factor < 1.0))
    problem = "backoff factor must be a finite number >= 1 (exponential and full jitter)";
  else if (b->kind == KEEL_BACKOFF_LINEAR && (!isfinite(b->factor) || b->factor < 0.0))
    problem = "backoff factor must be a finite number >= 0 (linear)";
  else if (b->max_ms != 0 && b->max_ms < b->base_ms)
    problem = "backoff max_ms must be 0 (no cap) or >= base_ms";
  else if (b->kind == KEEL_BACKOFF_DECORRELATED_JITTER && b->base_ms == 0)
    problem = "decorrelated jitter needs base_ms > 0 (it grows from base_ms)";
  if (why != NULL) *why = problem;
  return problem == NULL ? 0 : UV_EINVAL;
}

/* Saturation point without a cap (about 292 million years in ms): far
 * beyond any useful delay, and loop time + delay still fits in uint64_t. */
#define KEEL_BACKOFF_SATURATE (UINT64_MAX / 2)

static uint64_t cap_of(const keel_backoff *b) {
  return b->max_ms != 0 && b->max_ms < KEEL_BACKOFF_SATURATE ? b->max_ms : KEEL_BACKOFF_SATURATE;
}

/* min(cap, base * factor^(retry-1)) by binary powering: O(log retry) for any
 * retry number (a factor of 1.0000001 must not loop a billion times), exact
 * for factors like 2 and 1.5, rounded to the nearest millisecond. */
static uint64_t exponential_delay(const keel_backoff *b, unsigned retry) {
  uint64_t cap = cap_of(b);
  if (b->base_ms >= cap) return cap;
  if (b->base_ms == 0) return 0;
  double factor = b->factor;
  if (!(factor >= 1.0) || !isfinite(factor)) factor = 1.0; /* NaN, < 1, inf */
  double delay = (double)b->base_ms;
  double power = factor;
  unsigned exponent = retry - 1;
  while (exponent != 0) {
    if (exponent & 1u) {
      delay *= power;
      if (!(delay < (double)cap)) return cap;
    }
    exponent >>= 1;
    if (exponent != 0) power *= power; /* may become inf: delay then caps */
  }
  delay += 0.5;
  if (!(delay < (double)cap)) return cap;
  return (uint64_t)delay;
}

uint64_t keel_backoff_delay(const keel_backoff *b, unsigned retry, uint64_t prev_delay_ms,
                            keel_rng *rng) {
  if (b == NULL) return 0;
  if (retry == 0) retry = 1;
  uint64_t cap = cap_of(b);
  switch (b->kind) {
    case KEEL_BACKOFF_FIXED:
      return b->base_ms < cap ? b->base_ms : cap;
    case KEEL_BACKOFF_EXPONENTIAL:
      return exponential_delay(b, retry);
    case KEEL_BACKOFF_FULL_JITTER: {
      /* sleep = random_between(0, min(cap, base * 2 ** attempt)) */
      uint64_t ceiling = exponential_delay(b, retry);
      return rng == NULL ? ceiling : keel_rng_between(rng, 0, ceiling);
    }
    case KEEL_BACKOFF_LINEAR: {
      double factor = isfinite(b->factor) && b->factor >= 0.0 ? b->factor : 0.0;
      double delay = (double)b->base_ms * (1.0 + factor * (double)(retry - 1)) + 0.5;
      return delay < (double)cap ? (uint64_t)delay : cap;
    }
    case KEEL_BACKOFF_DECORRELATED_JITTER: {
      /* sleep = min(cap, random_between(base, sleep * 3)), sleep starting at
       * base. The draw is over the full [base, 3 * sleep] range and only
       * then capped, as in the AWS formula (not a draw in [base, cap]). */
      uint64_t base = b->base_ms < cap ? b->base_ms : cap;
      uint64_t prev = prev_delay_ms < base ? base : prev_delay_ms;
      uint64_t high = prev > UINT64_MAX / 3 ? UINT64_MAX : prev * 3;
      uint64_t delay = rng == NULL ? high : keel_rng_between(rng, base, high);
      return delay < cap ? delay : cap;
    }
  }
  /* Unknown kind (keel_backoff_validate() rejects it): the capped base. */
  return b->base_ms < cap ? b->base_ms : cap;
}
