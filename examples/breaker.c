/*
 * examples/breaker.c — a circuit breaker guarding a flaky remote call.
 *
 * The "remote service" is simulated with a timer: it answers in 5 ms, fails
 * every call during an outage, then recovers. The breaker (3 failures in a
 * row, 200 ms open) stops hammering it during the outage and closes again
 * once a probe succeeds. State changes are printed as they happen.
 *
 * Run: ./breaker            a 2-second scenario; exits 0 if it saw the breaker
 *                           open and close again
 *      ./breaker --forever  outages come and go until Ctrl-C
 */
#include <keel.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct service {
  uv_loop_t *loop;
  keel_breaker *breaker;
  uv_timer_t tick;    /* issues one request every 10 ms */
  uv_signal_t sigint; /* Ctrl-C in --forever mode */
  uint64_t started_ms;
  bool forever;
  int opened, closed; /* state changes seen */
  int ok, failed, rejected;
} service;

/* One simulated request in flight: completes after 5 ms. */
typedef struct request {
  uv_timer_t timer;
  keel_breaker_call *call;
  service *svc;
} request;

/* The remote service is down from 300 ms to 900 ms of every 1.5 s cycle. */
static bool remote_is_down(service *svc) {
  uint64_t t = (uv_now(svc->loop) - svc->started_ms) % 1500;
  return t >= 300 && t < 900;
}

static void request_freed(uv_handle_t *handle) {
  free(handle->data);
}

static void remote_answered(uv_timer_t *timer) {
  request *req = timer->data;
  /* Report the outcome to the breaker; it calls on_done. */
  keel_breaker_done(req->call, remote_is_down(req->svc) ? UV_ECONNREFUSED : 0);
  req->timer.data = req;
  uv_close((uv_handle_t *)&req->timer, request_freed);
}

/* The guarded operation: start the remote call, report later. */
static void call_remote(keel_breaker_call *call, void *data) {
  service *svc = data;
  request *req = malloc(sizeof *req);
  if (req == NULL) {
    keel_breaker_done(call, UV_ENOMEM);
    return;
  }
  req->call = call;
  req->svc = svc;
  uv_timer_init(svc->loop, &req->timer);
  req->timer.data = req;
  uv_timer_start(&req->timer, remote_answered, 5, 0);
}

static void on_done(keel_breaker *b, int status, void *data) {
  (void)b;
  service *svc = data;
  if (status == 0)
    svc->ok++;
  else if (status == KEEL_EOPEN)
    svc->rejected++; /* a real service would serve a fallback here */
  else
    svc->failed++;
}

static void on_state_change(keel_breaker *b, keel_breaker_state from, keel_breaker_state to,
                            void *data) {
  (void)b;
  service *svc = data;
  printf("[%5llu ms] breaker %s -> %s\n", (unsigned long long)(uv_now(svc->loop) - svc->started_ms),
         keel_breaker_state_name(from), keel_breaker_state_name(to));
  if (to == KEEL_BREAKER_OPEN) svc->opened++;
  if (to == KEEL_BREAKER_CLOSED) svc->closed++;
}

static void shut_down(service *svc) {
  uv_timer_stop(&svc->tick);
  uv_close((uv_handle_t *)&svc->tick, NULL);
  uv_close((uv_handle_t *)&svc->sigint, NULL);
  keel_breaker_close(svc->breaker, NULL, NULL);
}

static void on_tick(uv_timer_t *timer) {
  service *svc = timer->data;
  if (!svc->forever && uv_now(svc->loop) - svc->started_ms >= 2000) {
    shut_down(svc);
    return;
  }
  int rc = keel_breaker_execute(svc->breaker, call_remote, 100, on_done, svc);
  if (rc != 0) fprintf(stderr, "execute: %s\n", keel_strerror(rc));
}

static void on_sigint(uv_signal_t *signal, int signum) {
  (void)signum;
  shut_down(signal->data);
}

int main(int argc, char **argv) {
  service svc;
  memset(&svc, 0, sizeof svc);
  svc.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  svc.loop = uv_default_loop();
  svc.started_ms = uv_now(svc.loop);

  keel_breaker_opts opts;
  keel_breaker_opts_init(&opts);
  opts.failure_threshold = 3;  /* the seed uses 5 */
  opts.reset_timeout_ms = 200; /* the seed uses 30000 */
  opts.on_state_change = on_state_change;
  opts.data = &svc;
  int rc = keel_breaker_new(svc.loop, &opts, &svc.breaker);
  if (rc != 0) {
    fprintf(stderr, "keel_breaker_new: %s\n", keel_strerror(rc));
    return 1;
  }

  uv_timer_init(svc.loop, &svc.tick);
  svc.tick.data = &svc;
  uv_timer_start(&svc.tick, on_tick, 0, 10);
  uv_signal_init(svc.loop, &svc.sigint);
  svc.sigint.data = &svc;
  uv_signal_start_oneshot(&svc.sigint, on_sigint, SIGINT);

  uv_run(svc.loop, UV_RUN_DEFAULT);

  printf("requests: %d ok, %d failed, %d rejected by the open breaker\n", svc.ok, svc.failed,
         svc.rejected);
  rc = uv_loop_close(svc.loop);
  if (rc != 0) {
    fprintf(stderr, "uv_loop_close: %s\n", keel_strerror(rc));
    return 1;
  }
  return svc.opened >= 1 && svc.closed >= 1 && svc.rejected > 0 ? 0 : 1;
}
