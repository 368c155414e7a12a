/* The adaptive concurrency limit of keel/adaptive.h: a window of latency
 * samples, and a gradient (Envoy) or AIMD update of the limit at the end of
 * each window. Pure arithmetic: no loop, no clock. */
#include "keel/adaptive.h"

#include <math.h>
#include <string.h>

#include "core/alloc.h"

struct keel_adaptive {
  keel_adaptive_opts opts;
  double limit; /* kept fractional so small steps add up */
  uint32_t limit_int;
  uint32_t in_flight;
  uint32_t window_max_in_flight;
  uint32_t window_count;
  bool window_dropped;
  double window_sum;
  uint64_t min_rtt;
  uint64_t last_rtt;
  keel_adaptive_stats stats;
};

void keel_adaptive_opts_init(keel_adaptive_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->algorithm = KEEL_ADAPTIVE_GRADIENT;
  opts->initial_limit = 20;
  opts->min_limit = 1;
  opts->max_limit = 1000;
  opts->window_samples = 0;
  opts->rtt_tolerance = 0.0;
  opts->aimd_backoff = 0.9;
  opts->aimd_latency = 0;
}

int keel_adaptive_validate_opts(const keel_adaptive_opts *o, const char **why) {
  const char *problem = NULL;
  if (o == NULL)
    problem = "opts is NULL";
  else if (o->algorithm != KEEL_ADAPTIVE_GRADIENT && o->algorithm != KEEL_ADAPTIVE_AIMD)
    problem = "algorithm must be KEEL_ADAPTIVE_GRADIENT or KEEL_ADAPTIVE_AIMD";
  else if (o->min_limit == 0)
    problem = "min_limit must be >= 1";
  else if (o->max_limit < o->min_limit)
    problem = "max_limit must be >= min_limit";
  else if (!(isfinite(o->rtt_tolerance) && o->rtt_tolerance >= 0.0))
    problem = "rtt_tolerance must be a finite number >= 0";
  else if (!(o->aimd_backoff > 0.0 && o->aimd_backoff < 1.0))
    problem = "aimd_backoff must be within (0, 1)";
  if (why != NULL) *why = problem;
  return problem == NULL ? 0 : UV_EINVAL;
}

static void set_limit(keel_adaptive *a, double limit) {
  if (limit < (double)a->opts.min_limit) limit = (double)a->opts.min_limit;
  if (limit > (double)a->opts.max_limit) limit = (double)a->opts.max_limit;
  a->limit = limit;
  a->limit_int = (uint32_t)limit;
}

int keel_adaptive_new(const keel_adaptive_opts *opts, keel_adaptive **out) {
  if (out == NULL || keel_adaptive_validate_opts(opts, NULL) != 0) return UV_EINVAL;
  keel_adaptive *a = keel__calloc(1, sizeof *a);
  if (a == NULL) return UV_ENOMEM;
  a->opts = *opts;
  if (a->opts.algorithm == KEEL_ADAPTIVE_AIMD && a->opts.rtt_tolerance == 0.0)
    a->opts.rtt_tolerance = 0.1;
  set_limit(a, (double)opts->initial_limit);
  *out = a;
  return 0;
}

void keel_adaptive_free(keel_adaptive *a) {
  keel__free(a);
}

bool keel_adaptive_try_acquire(keel_adaptive *a) {
  if (a == NULL) return false;
  if (a->in_flight >= a->limit_int) {
    a->stats.rejected++;
    return false;
  }
  a->in_flight++;
  if (a->in_flight > a->window_max_in_flight) a->window_max_in_flight = a->in_flight;
  a->stats.acquired++;
  return true;
}

bool keel_adaptive_has_room(const keel_adaptive *a) {
  return a != NULL && a->in_flight < a->limit_int;
}

/* The end of a window: move the limit. */
static void update(keel_adaptive *a) {
  double rtt = a->window_sum / (double)a->window_count;
  /* 2^64 and above (an average of samples near UINT64_MAX) does not fit a
   * uint64_t: converting it would be undefined (0 on x86). */
  uint64_t rtt_int = rtt < 1.0                       ? 1
                     : rtt >= 18446744073709551616.0 ? UINT64_MAX
                                                     : (uint64_t)(rtt + 0.5);
  if (a->min_rtt == 0 || rtt_int < a->min_rtt) a->min_rtt = rtt_int;
  a->last_rtt = rtt_int;
  double old = a->limit;
  double next;
  double unloaded = (double)a->min_rtt * (1.0 + a->opts.rtt_tolerance);
  if (a->opts.algorithm == KEEL_ADAPTIVE_GRADIENT) {
    double gradient = unloaded / rtt;
    if (gradient < 0.5) gradient = 0.5;
    if (gradient > 2.0) gradient = 2.0;
    next = old * gradient + sqrt(old);
  } else {
    double bound = a->opts.aimd_latency != 0 ? (double)a->opts.aimd_latency : unloaded;
    if (a->window_dropped || rtt > bound)
      next = old * a->opts.aimd_backoff;
    else
      next = old + 1.0;
  }
  /* Grow only a limit that is used: an idle limit says nothing about
   * whether more would be fine. */
  if (next > old && (double)a->window_max_in_flight * 2.0 < old) next = old;
  set_limit(a, next);
  a->stats.windows++;
  if (a->limit > old)
    a->stats.increases++;
  else if (a->limit < old)
    a->stats.decreases++;
  a->window_count = 0;
  a->window_sum = 0.0;
  a->window_dropped = false;
  a->window_max_in_flight = a->in_flight;
}

int keel_adaptive_release(keel_adaptive *a, uint64_t rtt, keel_adaptive_outcome outcome) {
  if (a == NULL || a->in_flight == 0) return UV_EINVAL;
  if (outcome != KEEL_ADAPTIVE_SUCCESS && outcome != KEEL_ADAPTIVE_DROPPED &&
      outcome != KEEL_ADAPTIVE_IGNORE)
    return UV_EINVAL;
  a->in_flight--;
  if (outcome == KEEL_ADAPTIVE_IGNORE) return 0;
  if (outcome == KEEL_ADAPTIVE_DROPPED) {
    a->stats.dropped++;
    a->window_dropped = true;
  }
  a->window_sum += (double)(rtt == 0 ? 1 : rtt);
  a->window_count++;
  uint32_t want = a->opts.window_samples;
  if (want == 0) want = a->limit_int < 10 ? 10 : a->limit_int;
  if (a->window_count >= want) update(a);
  return 0;
}

uint32_t keel_adaptive_limit(const keel_adaptive *a) {
  return a == NULL ? 0 : a->limit_int;
}

void keel_adaptive_get_stats(const keel_adaptive *a, keel_adaptive_stats *out) {
  if (a == NULL || out == NULL) return;
  *out = a->stats;
  out->limit = a->limit_int;
  out->in_flight = a->in_flight;
  out->min_limit = a->opts.min_limit;
  out->max_limit = a->opts.max_limit;
  out->min_rtt = a->min_rtt;
  out->last_rtt = a->last_rtt;
  memset(out->reserved_, 0, sizeof out->reserved_);
}
