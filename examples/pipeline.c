/*
 * examples/pipeline.c — an HTTP-like client call guarded by a pipeline:
 * rate limit -> timeout -> retry -> breaker -> fallback.
 *
 * The "remote service" is simulated with timers: a request takes 5 ms,
 * one in five is slow (80 ms: longer than the 50 ms per-call timeout) and
 * during an outage (300..700 ms of every second) every request fails with
 * 503. The client sends a request every 2 ms, more than the 200 requests/s
 * its limiter allows. A call goes through rate limit -> timeout -> retry ->
 * breaker, and a fallback catches what fails; as in Polly, the fallback is
 * the outermost policy so that it sees every failure (the policy list is
 * outermost first):
 *
 *   fallback     a failure becomes a cached answer; a rate-limit rejection
 *                is passed on (the caller gets KEEL_ERATELIMIT and the
 *                Retry-After)
 *   rate limit   GCRA, 200/s with bursts of 20
 *   timeout      50 ms for each call, retries included
 *   retry        3 attempts, 5 ms then 10 ms apart
 *   breaker      opens after 5 failures in a row, for 100 ms
 *
 * A slow request is told to stop (its timer is cancelled) when the timeout
 * expires. The program prints every breaker change and the pipeline's
 * counters at the end.
 *
 * Run: ./pipeline            a 1.5-second scenario; exits 0 if it saw calls
 *                            served, rate limited, timed out, retried, the
 *                            breaker open and fallbacks used
 *      ./pipeline --forever  until Ctrl-C
 */
#include <keel.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTTP_503 (-503) /* the operation's own error code for a 503 */

typedef struct client {
  uv_loop_t *loop;
  keel_ratelimit *limiter;
  keel_breaker *breaker;
  keel_pipeline *pipeline;
  uv_timer_t tick;
  uv_signal_t sigint;
  uint64_t started_ms;
  uint64_t sent;
  bool forever;
  int served, cached, limited, other, opened;
} client;

/* One request: the caller's data, passed to the operation and to done. */
typedef struct request {
  client *c;
  int body; /* the "response": 200 from the service, 299 from the cache */
} request;

/* One attempt on the wire. */
typedef struct wire {
  uv_timer_t timer;
  keel_attempt *attempt;
  int status;
} wire;

static void wire_closed(uv_handle_t *h) {
  free(h);
}

static void on_reply(uv_timer_t *t) {
  wire *w = (wire *)t;
  keel_attempt_done(w->attempt, w->status);
  uv_close((uv_handle_t *)t, wire_closed);
}

/* Told to stop (timeout, or the pipeline closing): drop the request and
 * report, as every attempt must. */
static void on_stop(keel_attempt *a, int reason, void *data) {
  wire *w = data;
  uv_timer_stop(&w->timer);
  keel_attempt_done(a, reason);
  uv_close((uv_handle_t *)&w->timer, wire_closed);
}

/* The operation: one HTTP-like request. */
static void send_request(keel_attempt *a, void *data) {
  request *req = data;
  client *c = req->c;
  uint64_t t = (uv_now(c->loop) - c->started_ms) % 1000;
  bool down = t >= 300 && t < 700;
  bool slow = c->sent % 5 == 0;
  wire *w = malloc(sizeof *w);
  if (w == NULL) {
    keel_attempt_done(a, UV_ENOMEM);
    return;
  }
  w->attempt = a;
  w->status = down ? HTTP_503 : 0;
  uv_timer_init(c->loop, &w->timer);
  uv_timer_start(&w->timer, on_reply, slow ? 80 : 5, 0);
  keel_attempt_on_cancel(a, on_stop, w);
}

/* The fallback: a failure becomes the cached answer, except a rate-limit
 * rejection, which the caller answers with 429 and Retry-After. */
static int serve_cached(keel_pipeline *p, int status, void *call_data, void *data) {
  (void)p;
  (void)data;
  if (status == KEEL_ERATELIMIT) return status; /* declined */
  ((request *)call_data)->body = 299;
  return 0;
}

static void on_done(keel_pipeline *p, const keel_pipeline_result *r, void *data) {
  (void)p;
  request *req = data;
  client *c = req->c;
  if (r->status == 0 && req->body == 200)
    c->served++;
  else if (r->status == 0)
    c->cached++;
  else if (r->status == KEEL_ERATELIMIT)
    c->limited++;
  else
    c->other++;
  free(req);
}

static void on_breaker(keel_breaker *b, keel_breaker_state from, keel_breaker_state to,
                       void *data) {
  (void)b;
  client *c = data;
  if (to == KEEL_BREAKER_OPEN) c->opened++;
  printf("%5llu ms  breaker %s -> %s\n", (unsigned long long)(uv_now(c->loop) - c->started_ms),
         keel_breaker_state_name(from), keel_breaker_state_name(to));
}

static void shut_down(client *c) {
  uv_timer_stop(&c->tick);
  uv_close((uv_handle_t *)&c->tick, NULL);
  uv_close((uv_handle_t *)&c->sigint, NULL);
  keel_pipeline_stats st;
  keel_pipeline_get_stats(c->pipeline, &st);
  printf("calls %llu: served %d, from the cache %d, rate limited %d, other %d\n",
         (unsigned long long)st.calls, c->served, c->cached, c->limited, c->other);
  printf(
      "attempts %llu, retries %llu, timeouts %llu, breaker rejections %llu, "
      "fallbacks %llu, attempts told to stop %llu\n",
      (unsigned long long)st.attempts, (unsigned long long)st.retries,
      (unsigned long long)st.timeouts, (unsigned long long)st.breaker_rejected,
      (unsigned long long)st.fallbacks, (unsigned long long)st.cancels);
  /* the pipeline first: it uses the limiter and the breaker */
  keel_pipeline_close(c->pipeline, NULL, NULL);
  keel_breaker_close(c->breaker, NULL, NULL);
  keel_ratelimit_close(c->limiter, NULL, NULL);
}

static void on_tick(uv_timer_t *t) {
  client *c = t->data;
  if (!c->forever && uv_now(c->loop) - c->started_ms >= 1500) {
    shut_down(c);
    return;
  }
  request *req = malloc(sizeof *req);
  if (req == NULL) return;
  req->c = c;
  req->body = 200;
  c->sent++;
  if (keel_pipeline_execute(c->pipeline, send_request, on_done, req) != 0) free(req);
}

static void on_sigint(uv_signal_t *s, int signum) {
  (void)signum;
  shut_down(s->data);
}

int main(int argc, char **argv) {
  client c;
  memset(&c, 0, sizeof c);
  c.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  c.loop = uv_default_loop();
  c.started_ms = uv_now(c.loop);

  keel_ratelimit_opts ro;
  keel_ratelimit_opts_init(&ro);
  ro.rate = 200;
  ro.burst = 20;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  bo.reset_timeout_ms = 100;
  bo.on_state_change = on_breaker;
  bo.data = &c;
  if (keel_ratelimit_new(c.loop, &ro, &c.limiter) != 0 ||
      keel_breaker_new(c.loop, &bo, &c.breaker) != 0)
    return 1;

  keel_retry_opts retry;
  keel_retry_opts_init(&retry);
  retry.max_attempts = 3;
  keel_backoff_exponential(&retry.backoff, 5, 2.0, 0);
  keel_policy pol[5]; /* outermost first */
  keel_policy_fallback(&pol[0], serve_cached, NULL);
  keel_policy_ratelimit(&pol[1], c.limiter);
  keel_policy_timeout(&pol[2], 50);
  keel_policy_retry(&pol[3], &retry);
  keel_policy_breaker(&pol[4], c.breaker);
  keel_pipeline_opts po;
  keel_pipeline_opts_init(&po);
  po.policies = pol;
  po.npolicies = 5;
  if (keel_pipeline_new(c.loop, &po, &c.pipeline) != 0) return 1;

  uv_timer_init(c.loop, &c.tick);
  c.tick.data = &c;
  uv_timer_start(&c.tick, on_tick, 0, 2);
  uv_signal_init(c.loop, &c.sigint);
  c.sigint.data = &c;
  uv_signal_start_oneshot(&c.sigint, on_sigint, SIGINT);
  uv_run(c.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(c.loop) != 0) return 1;

  bool ok = c.served > 0 && c.cached > 0 && c.limited > 0 && c.opened > 0;
  printf("%s\n",
         ok ? "ok" : "FAILED: expected served, cached, rate-limited calls and an open breaker");
  return ok ? 0 : 1;
}
