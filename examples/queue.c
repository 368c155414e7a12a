/*
 * examples/queue.c — an onboarding worker, like the seed's QueueProcessor.
 *
 * New users are queued for onboarding (create profile, set preferences,
 * send a welcome email — simulated with a 20 ms timer). Two run at a time;
 * a flaky email service makes some attempts fail, and they are retried with
 * exponential backoff. Paying customers go into a priority lane (priority
 * 10) and are onboarded before the free ones (priority 0).
 *
 * Run: ./queue            onboards 12 users and exits 0 when all succeeded
 *      ./queue --forever  keeps queueing a user every 100 ms until Ctrl-C
 */
#include <keel.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct user {
  int id;
  char email[64];
  bool paying;
} user;

typedef struct app {
  uv_loop_t *loop;
  keel_queue *queue;
  uv_timer_t producer; /* --forever: a new user every 100 ms */
  uv_signal_t sigint;
  int next_id;
  int onboarded, failed;
  bool forever;
} app;

/* One onboarding in progress. */
typedef struct work {
  uv_timer_t timer;
  keel_job *job;
} work;

static void work_freed(uv_handle_t *handle) {
  free(handle->data);
}

static void onboarding_finished(uv_timer_t *timer) {
  work *w = timer->data;
  user *u = keel_job_payload(w->job);
  /* The email service fails the first attempt for every third user. */
  bool email_failed = u->id % 3 == 0 && keel_job_attempt(w->job) == 1;
  keel_job_done(w->job, email_failed ? UV_ECONNRESET : 0);
  uv_close((uv_handle_t *)&w->timer, work_freed);
}

/* The process function: start the work, report with keel_job_done later. */
static void onboard(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  app *a = data;
  user *u = payload;
  printf("onboarding %-22s (attempt %u, priority %d)\n", u->email, keel_job_attempt(job),
         keel_job_priority(job));
  work *w = malloc(sizeof *w);
  if (w == NULL) {
    keel_job_done(job, UV_ENOMEM);
    return;
  }
  w->job = job;
  uv_timer_init(a->loop, &w->timer);
  w->timer.data = w;
  uv_timer_start(&w->timer, onboarding_finished, 20, 0);
}

static void on_complete(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)job;
  app *a = data;
  printf("  done: %s\n", ((user *)payload)->email);
  a->onboarded++;
}

/* The seed's onError: every failed attempt, final or not. */
static void on_error(keel_queue *q, keel_job *job, void *payload, int status, unsigned attempts,
                     bool final, void *data) {
  (void)q;
  (void)job;
  app *a = data;
  printf("  error onboarding %s: %s (attempt %u%s)\n", ((user *)payload)->email,
         keel_strerror(status), attempts, final ? ", giving up" : ", will retry");
  if (final) a->failed++;
}

static void release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  (void)status;
  (void)data;
  free(payload);
}

static void shut_down(app *a) {
  keel_queue_stats s;
  keel_queue_get_stats(a->queue, &s);
  printf("stats: pushed %llu, completed %llu, retried %llu, failed %llu; run p50 %.0f us\n",
         (unsigned long long)s.pushed, (unsigned long long)s.completed,
         (unsigned long long)s.retried, (unsigned long long)s.failed, s.run.p50_us);
  keel_queue_close(a->queue, NULL, NULL);
  if (!uv_is_closing((uv_handle_t *)&a->producer)) uv_close((uv_handle_t *)&a->producer, NULL);
  if (!uv_is_closing((uv_handle_t *)&a->sigint)) uv_close((uv_handle_t *)&a->sigint, NULL);
}

static void on_drain(keel_queue *q, void *data) {
  (void)q;
  app *a = data;
  if (!a->forever) shut_down(a);
}

static int queue_user(app *a, bool paying) {
  user *u = malloc(sizeof *u);
  if (u == NULL) return UV_ENOMEM;
  u->id = ++a->next_id;
  u->paying = paying;
  snprintf(u->email, sizeof u->email, "user%d@example.com", u->id);
  uint64_t id;
  int rc = keel_queue_push(a->queue, u, paying ? 10 : 0, &id);
  if (rc != 0) {
    free(u); /* not accepted: still ours */
    return rc;
  }
  printf("queued %s with id %llu\n", u->email, (unsigned long long)id);
  return 0;
}

static void produce(uv_timer_t *timer) {
  app *a = timer->data;
  queue_user(a, a->next_id % 4 == 0);
}

static void on_sigint(uv_signal_t *signal, int signum) {
  (void)signum;
  shut_down(signal->data);
}

int main(int argc, char **argv) {
  app a;
  memset(&a, 0, sizeof a);
  a.loop = uv_default_loop();
  a.forever = argc > 1 && strcmp(argv[1], "--forever") == 0;

  keel_queue_opts opts;
  keel_queue_opts_init(&opts);
  opts.concurrency = 2;                                         /* the seed's concurrency */
  opts.max_retries = 3;                                         /* the seed's maxRetries */
  keel_backoff_exponential(&opts.retry_backoff, 50, 2.0, 1000); /* 50, 100, 200 ms */
  opts.timeout_ms = 5000;
  opts.on_complete = on_complete;
  opts.on_error = on_error;
  opts.release = release;
  opts.on_drain = on_drain;
  opts.data = &a;
  int rc = keel_queue_new(a.loop, onboard, &opts, &a.queue);
  if (rc != 0) {
    fprintf(stderr, "keel_queue_new: %s\n", keel_strerror(rc));
    return 1;
  }

  for (int i = 0; i < 12; i++) queue_user(&a, i % 4 == 3); /* every 4th is paying */

  uv_timer_init(a.loop, &a.producer);
  a.producer.data = &a;
  uv_signal_init(a.loop, &a.sigint);
  a.sigint.data = &a;
  if (a.forever) {
    uv_timer_start(&a.producer, produce, 100, 100);
    uv_signal_start_oneshot(&a.sigint, on_sigint, SIGINT);
  } else {
    uv_unref((uv_handle_t *)&a.sigint);
  }

  uv_run(a.loop, UV_RUN_DEFAULT);
  if (uv_loop_close(a.loop) != 0) {
    fprintf(stderr, "uv_loop_close: handles left open\n");
    return 1;
  }
  printf("onboarded %d users, %d failed\n", a.onboarded, a.failed);
  return a.onboarded == a.next_id && a.failed == 0 ? 0 : 1;
}
