/* Job queue: ordering against a reference model, concurrency, retries and
 * backoff, timeouts, cancel, pause/resume, drain, back-pressure, thread-safe
 * pushes, close in every state, stats, allocation failure. Real loop. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/queue.h"
#include "support/harness.h"

#define MAX_JOBS 200000

typedef struct harness {
  uv_loop_t loop;
  keel_queue_opts opts;
  keel_queue *q;
  /* behaviour */
  int fail_times; /* each job fails this many attempts first */
  int fail_status;
  bool hold; /* keep jobs running (don't call done) */
  /* observations */
  int order[MAX_JOBS];
  int order_count;
  unsigned running, max_running;
  keel_job *held[1024];
  int held_count;
  int completed, errors, finals, drains;
  int released[MAX_JOBS]; /* per payload value: times released */
  int release_status[MAX_JOBS];
  uint64_t attempt_ms[16];
  int attempt_count;
} harness;

static int attempts_of[MAX_JOBS];

static void process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  harness *h = data;
  int value = (int)(intptr_t)payload;
  if (h->order_count < MAX_JOBS) h->order[h->order_count++] = value;
  if (h->attempt_count < 16) h->attempt_ms[h->attempt_count++] = uv_now(&h->loop);
  h->running++;
  if (h->running > h->max_running) h->max_running = h->running;
  cr_assert_eq(keel_job_payload(job), payload);
  cr_assert_eq(keel_job_attempt(job), (unsigned)++attempts_of[value]);
  if (h->hold) {
    h->held[h->held_count++] = job;
    return;
  }
  h->running--;
  keel_job_done(job, attempts_of[value] <= h->fail_times ? h->fail_status : 0);
}

static void on_complete(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)job;
  (void)payload;
  ((harness *)data)->completed++;
}

static void on_error(keel_queue *q, keel_job *job, void *payload, int status, unsigned attempts,
                     bool final, void *data) {
  (void)q;
  (void)job;
  (void)payload;
  (void)status;
  (void)attempts;
  harness *h = data;
  h->errors++;
  if (final) h->finals++;
}

static void release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  harness *h = data;
  int value = (int)(intptr_t)payload;
  h->released[value]++;
  h->release_status[value] = status;
}

static void on_drain(keel_queue *q, void *data) {
  (void)q;
  ((harness *)data)->drains++;
}

static harness *setup(void) {
  harness *h = calloc(1, sizeof *h);
  memset(attempts_of, 0, sizeof attempts_of);
  uv_loop_init(&h->loop);
  keel_queue_opts_init(&h->opts);
  h->opts.on_complete = on_complete;
  h->opts.on_error = on_error;
  h->opts.release = release;
  h->opts.on_drain = on_drain;
  h->opts.data = h;
  h->opts.seed = 1;
  h->fail_status = UV_EIO;
  return h;
}

static void create(harness *h) {
  cr_assert_eq(keel_queue_new(&h->loop, process, &h->opts, &h->q), 0);
}

static void finish(harness *h) {
  keel_queue_close(h->q, NULL, NULL);
  kt_loop_finish(&h->loop);
  free(h);
}

static void finish_held(harness *h) {
  for (int i = 0; i < h->held_count; i++) keel_job_done(h->held[i], 0);
  h->held_count = 0;
}

Test(queue, defaults_are_the_seeds) {
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  cr_assert_eq(o.concurrency, 1);
  cr_assert_eq(o.max_retries, 3);
  cr_assert_eq(keel_backoff_delay(&o.retry_backoff, 1, 0, NULL), 1000);
}

/* Reference model: stable sort by descending priority. */
typedef struct ref_item {
  int priority;
  int seq;
} ref_item;

static int ref_cmp(const void *a, const void *b) {
  const ref_item *x = a, *y = b;
  if (x->priority != y->priority) return x->priority < y->priority ? 1 : -1;
  return x->seq - y->seq;
}

Test(queue, priority_then_fifo_matches_reference_model) {
  harness *h = setup();
  create(h);
  enum { N = 20000 };
  static ref_item ref[N];
  srand(12345);
  for (int i = 0; i < N; i++) {
    int priority = (i % 7 == 0) ? rand() - RAND_MAX / 2 : rand() % 10 - 3; /* any int */
    ref[i].priority = priority;
    ref[i].seq = i;
    cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)i, priority, NULL), 0);
  }
  cr_assert_eq(h->order_count, 0, "nothing runs inside push");
  uv_run(&h->loop, UV_RUN_DEFAULT);
  qsort(ref, N, sizeof *ref, ref_cmp);
  cr_assert_eq(h->order_count, N);
  for (int i = 0; i < N; i++) cr_assert_eq(h->order[i], ref[i].seq, "position %d", i);
  cr_assert_eq(h->completed, N);
  cr_assert_eq(h->drains, 1);
  for (int i = 0; i < N; i++) cr_assert_eq(h->released[i], 1);
  finish(h);
}

Test(queue, concurrency_is_never_exceeded_and_changes_at_run_time) {
  harness *h = setup();
  h->opts.concurrency = 3;
  h->hold = true;
  create(h);
  for (int i = 0; i < 20; i++) keel_queue_push(h->q, (void *)(intptr_t)i, 0, NULL);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->held_count, 3);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.running, 3);
  cr_assert_eq(s.pending, 17);
  cr_assert_eq(keel_queue_set_concurrency(h->q, 5), 0);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->held_count, 5, "raising concurrency starts more at once");
  cr_assert_eq(keel_queue_set_concurrency(h->q, 0), UV_EINVAL);
  keel_queue_set_concurrency(h->q, 2);
  /* Finish everything, one batch at a time; never more than allowed. */
  while (h->held_count > 0) {
    int n = h->held_count;
    h->running -= (unsigned)n;
    finish_held(h);
    uv_run(&h->loop, UV_RUN_NOWAIT);
    cr_assert_leq(h->held_count, 2);
  }
  cr_assert_eq(h->completed, 20);
  cr_assert_leq(h->max_running, 5);
  finish(h);
}

Test(queue, retries_follow_the_backoff_then_fail_finally) {
  harness *h = setup();
  keel_backoff_exponential(&h->opts.retry_backoff, 20, 2.0, 0);
  h->opts.max_retries = 2;
  h->fail_times = 100;
  create(h);
  keel_queue_push(h->q, (void *)(intptr_t)7, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->attempt_count, 3, "1 attempt + 2 retries");
  cr_assert_geq(h->attempt_ms[1] - h->attempt_ms[0], 20);
  cr_assert_geq(h->attempt_ms[2] - h->attempt_ms[1], 40);
  cr_assert_eq(h->errors, 3);
  cr_assert_eq(h->finals, 1);
  cr_assert_eq(h->released[7], 1);
  cr_assert_eq(h->release_status[7], UV_EIO);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.retried, 2);
  cr_assert_eq(s.failed, 1);
  cr_assert_eq(s.completed, 0);
  finish(h);
}

Test(queue, retry_succeeds_and_does_not_hold_a_slot) {
  harness *h = setup();
  keel_backoff_fixed(&h->opts.retry_backoff, 30);
  h->fail_times = 1;
  create(h);
  keel_queue_push(h->q, (void *)(intptr_t)1, 0, NULL);
  keel_queue_push(h->q, (void *)(intptr_t)2, 0, NULL);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  /* Job 1 failed and waits 30 ms; with concurrency 1, job 2 ran meanwhile. */
  cr_assert_geq(h->order_count, 2);
  cr_assert_eq(h->order[0], 1);
  cr_assert_eq(h->order[1], 2);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->completed, 2);
  cr_assert_eq(h->finals, 0);
  finish(h);
}

static int not_eperm(int status, void *data) {
  (void)data;
  return status != UV_EPERM;
}

Test(queue, classifier_makes_an_error_final) {
  harness *h = setup();
  h->opts.classify = not_eperm;
  h->fail_times = 100;
  h->fail_status = UV_EPERM;
  create(h);
  keel_queue_push(h->q, (void *)(intptr_t)3, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->attempt_count, 1);
  cr_assert_eq(h->finals, 1);
  cr_assert_eq(h->release_status[3], UV_EPERM);
  finish(h);
}

Test(queue, per_push_overrides) {
  harness *h = setup();
  h->fail_times = 100;
  create(h);
  keel_queue_push_opts po;
  keel_queue_push_opts_init(&po);
  keel_backoff fast;
  keel_backoff_fixed(&fast, 1);
  po.backoff = &fast;
  po.max_retries = 4;
  po.priority = 5;
  uint64_t id = 0;
  cr_assert_eq(keel_queue_push_ex(h->q, (void *)(intptr_t)9, &po, &id), 0);
  cr_assert_neq(id, 0);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->attempt_count, 5);
  keel_backoff bad;
  keel_backoff_exponential(&bad, 10, 0.5, 0);
  po.backoff = &bad;
  cr_assert_eq(keel_queue_push_ex(h->q, (void *)(intptr_t)10, &po, NULL), UV_EINVAL);
  cr_assert_str_neq(keel_queue_last_error(h->q), "");
  finish(h);
}

Test(queue, timeout_then_late_done_is_ignored) {
  harness *h = setup();
  h->opts.timeout_ms = 20;
  h->opts.max_retries = 1;
  keel_backoff_fixed(&h->opts.retry_backoff, 1);
  h->hold = true;
  create(h);
  keel_queue_push(h->q, (void *)(intptr_t)4, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT); /* both attempts time out */
  cr_assert_eq(h->held_count, 2);
  cr_assert_eq(h->errors, 2);
  cr_assert_eq(h->finals, 1);
  cr_assert_eq(h->release_status[4], UV_ETIMEDOUT);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.timed_out, 2);
  cr_assert_eq(s.running, 0);
  cr_assert_eq(keel_job_done(h->held[0], 0), KEEL_ESTALE);
  cr_assert_eq(keel_job_done(h->held[1], 0), KEEL_ESTALE);
  cr_assert_eq(h->completed, 0, "a late done does not complete the job");
  cr_assert_eq(h->released[4], 1);
  h->held_count = 0;
  finish(h);
}

Test(queue, cancel_in_each_state) {
  harness *h = setup();
  h->hold = true;
  keel_backoff_fixed(&h->opts.retry_backoff, 60000);
  create(h);
  uint64_t running_id, pending_id, waiting_id;
  keel_queue_push(h->q, (void *)(intptr_t)1, 10, &waiting_id);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->held_count, 1);
  keel_job *first = h->held[0];
  h->held_count = 0;
  h->running--;
  keel_queue_push(h->q, (void *)(intptr_t)2, 5, &running_id);
  keel_queue_push(h->q, (void *)(intptr_t)3, 0, &pending_id);
  cr_assert_eq(keel_job_done(first, UV_EIO), 0); /* job 1 waits 60 s for its retry */
  cr_assert_eq(keel_job_done(first, 0), UV_EINVAL, "an attempt reports once");
  cr_assert_eq(keel_job_done(NULL, 0), UV_EINVAL);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->held_count, 1, "job 2 runs");
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.waiting, 1);
  cr_assert_eq(s.pending, 1);
  cr_assert_eq(s.running, 1);

  cr_assert_eq(keel_queue_cancel(h->q, running_id), KEEL_ENOTFOUND, "running");
  cr_assert_eq(keel_queue_cancel(h->q, pending_id), 0, "pending");
  cr_assert_eq(h->released[3], 1);
  cr_assert_eq(h->release_status[3], UV_ECANCELED);
  cr_assert_eq(keel_queue_cancel(h->q, pending_id), KEEL_ENOTFOUND, "gone");
  cr_assert_eq(keel_queue_cancel(h->q, waiting_id), 0, "waiting for retry");
  cr_assert_eq(h->released[1], 1);
  cr_assert_eq(keel_queue_cancel(h->q, 12345678), KEEL_ENOTFOUND, "unknown");
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.cancelled, 2);
  cr_assert_eq(s.waiting, 0);
  cr_assert_eq(s.pending, 0);
  finish_held(h);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->completed, 1);
  cr_assert_eq(h->order_count, 2, "the cancelled pending job never ran");
  finish(h);
}

Test(queue, pause_resume_and_drain) {
  harness *h = setup();
  create(h);
  keel_queue_pause(h->q);
  for (int i = 0; i < 10; i++) keel_queue_push(h->q, (void *)(intptr_t)i, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->order_count, 0);
  cr_assert_eq(h->drains, 0);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert(s.paused);
  keel_queue_resume(h->q);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->order_count, 10);
  cr_assert_eq(h->drains, 1);
  keel_queue_push(h->q, (void *)(intptr_t)11, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->drains, 2, "drain again after new work");
  finish(h);
}

Test(queue, back_pressure_with_max_pending) {
  harness *h = setup();
  h->opts.max_pending = 3;
  create(h);
  keel_queue_pause(h->q);
  for (int i = 0; i < 3; i++) cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)i, 0, NULL), 0);
  uint64_t id = 77;
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)3, 0, &id), KEEL_EFULL);
  cr_assert_eq(id, 77, "id untouched");
  cr_assert_eq(h->released[3], 0, "the caller keeps its payload");
  keel_queue_resume(h->q);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)3, 0, NULL), 0);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->completed, 4);
  finish(h);
}

static void done_at_once(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  keel_job_done(job, 0);
}

Test(queue, a_million_synchronous_completions_do_not_grow_the_stack) {
  harness *h = setup();
  h->opts.on_complete = NULL;
  h->opts.release = NULL;
  cr_assert_eq(keel_queue_new(&h->loop, done_at_once, &h->opts, &h->q), 0);
  enum { N = 1000000 };
  for (int i = 0; i < N; i++) keel_queue_push(h->q, NULL, i % 3, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.completed, N);
  cr_assert_eq(s.pushed, N);
  finish(h);
}

/* ---- thread-safe push -------------------------------------------------- */

typedef struct pusher {
  keel_queue *q;
  int base;
  int count;
} pusher;

static void push_thread(void *arg) {
  pusher *p = arg;
  for (int i = 0; i < p->count; i++)
    cr_assert_eq(keel_queue_push_threadsafe(p->q, (void *)(intptr_t)(p->base + i), 0), 0);
}

typedef struct ts_state {
  unsigned char *seen;
  int total;
  int done;
  uv_loop_t *loop;
} ts_state;

static void ts_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  ts_state *st = data;
  int value = (int)(intptr_t)payload;
  cr_assert_eq(st->seen[value], 0, "job %d ran twice", value);
  st->seen[value] = 1;
  st->done++;
  keel_job_done(job, 0);
}

static void ts_drain(keel_queue *q, void *data) {
  ts_state *st = data;
  if (st->done == st->total) keel_queue_close(q, NULL, NULL);
}

static void keepalive_expired(uv_timer_t *timer) {
  (void)timer;
  cr_assert_fail("thread-safe pushes did not all run within 60 s");
}

Test(queue, threadsafe_push_from_four_threads, .timeout = 120) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  enum { THREADS = 4, PER = 100000 };
  ts_state st = {calloc(THREADS * PER, 1), THREADS * PER, 0, &loop};
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 100;
  o.on_drain = ts_drain;
  o.data = &st;
  keel_queue *q;
  cr_assert_eq(keel_queue_new(&loop, ts_process, &o, &q), 0);
  uv_thread_t threads[THREADS];
  pusher pushers[THREADS];
  for (int t = 0; t < THREADS; t++) {
    pushers[t] = (pusher){q, t * PER, PER};
    uv_thread_create(&threads[t], push_thread, &pushers[t]);
  }
  /* Keep the loop alive until every thread is done and every job ran. */
  uv_timer_t keepalive;
  uv_timer_init(&loop, &keepalive);
  uv_timer_start(&keepalive, keepalive_expired, 60000, 0);
  while (st.done < st.total) uv_run(&loop, UV_RUN_ONCE);
  for (int t = 0; t < THREADS; t++) uv_thread_join(&threads[t]);
  uv_close((uv_handle_t *)&keepalive, NULL);
  keel_queue_close(q, NULL, NULL);
  kt_loop_finish(&loop);
  for (int i = 0; i < st.total; i++) cr_assert_eq(st.seen[i], 1, "job %d lost", i);
  free(st.seen);
}

typedef struct race_state {
  keel_queue *q;
  int accepted;
  int refused;
} race_state;

static void race_thread(void *arg) {
  race_state *r = arg;
  for (int i = 0; i < 20000; i++) {
    int rc = keel_queue_push_threadsafe(r->q, (void *)(intptr_t)i, 0);
    if (rc == 0)
      r->accepted++;
    else {
      cr_assert_eq(rc, UV_ECANCELED);
      r->refused++;
    }
  }
}

static int race_outcomes;
static void race_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  race_outcomes++;
  keel_job_done(job, 0);
}
static void race_release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  if (status == UV_ECANCELED) race_outcomes++;
}

Test(queue, threadsafe_push_racing_with_close_loses_nothing) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.release = race_release;
  keel_queue *q;
  cr_assert_eq(keel_queue_new(&loop, race_process, &o, &q), 0);
  race_state r = {q, 0, 0};
  race_outcomes = 0;
  uv_thread_t thread;
  uv_thread_create(&thread, race_thread, &r);
  for (int i = 0; i < 5; i++) uv_run(&loop, UV_RUN_NOWAIT);
  keel_queue_close(q, NULL, NULL);
  uv_thread_join(&thread); /* the thread finishes before the close callback runs */
  kt_loop_finish(&loop);
  cr_assert_eq(r.accepted + r.refused, 20000);
  cr_assert_eq(race_outcomes, r.accepted, "every accepted push ran or was released");
}

/* ---- close, stats, invalid input, allocation failure -------------------- */

Test(queue, close_with_work_in_every_state) {
  harness *h = setup();
  h->opts.concurrency = 2;
  h->hold = true;
  h->opts.timeout_ms = 10;
  h->opts.max_retries = 5;
  keel_backoff_fixed(&h->opts.retry_backoff, 60000);
  create(h);
  keel_queue_push(h->q, (void *)(intptr_t)1, 9, NULL); /* will time out → waiting */
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->held_count, 1);
  while (h->errors == 0) uv_run(&h->loop, UV_RUN_ONCE); /* timed out, waiting 60 s */
  keel_queue_push_opts po;
  keel_queue_push_opts_init(&po);
  po.priority = 5;
  po.timeout_ms = UINT64_MAX;                               /* no timeout for these two */
  keel_queue_push_ex(h->q, (void *)(intptr_t)2, &po, NULL); /* running */
  keel_queue_push_ex(h->q, (void *)(intptr_t)3, &po, NULL); /* running */
  uv_run(&h->loop, UV_RUN_NOWAIT);
  keel_queue_pause(h->q);
  keel_queue_push(h->q, (void *)(intptr_t)4, 0, NULL); /* pending */
  cr_assert_eq(h->held_count, 3);
  keel_queue_close(h->q, NULL, NULL);
  cr_assert_eq(h->released[1], 1, "waiting job released at close");
  cr_assert_eq(h->released[4], 1, "pending job released at close");
  cr_assert_eq(h->release_status[4], UV_ECANCELED);
  cr_assert_eq(h->released[2], 0, "running jobs are released when they report");
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)5, 0, NULL), UV_ECANCELED);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  keel_job_done(h->held[0], 0); /* the timed-out attempt of job 1 */
  keel_job_done(h->held[1], 0);
  keel_job_done(h->held[2], UV_EIO);
  cr_assert_eq(h->released[2], 1);
  cr_assert_eq(h->release_status[2], 0);
  cr_assert_eq(h->released[3], 1);
  cr_assert_eq(h->release_status[3], UV_EIO, "no retry while closing");
  kt_loop_finish(&h->loop);
  for (int i = 1; i <= 4; i++) cr_assert_eq(h->released[i], 1, "job %d released once", i);
  free(h);
}

Test(queue, stats_values) {
  harness *h = setup();
  h->opts.concurrency = 4;
  h->fail_times = 1;
  keel_backoff_fixed(&h->opts.retry_backoff, 0);
  create(h);
  for (int i = 0; i < 100; i++) keel_queue_push(h->q, (void *)(intptr_t)i, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.pushed, 100);
  cr_assert_eq(s.completed, 100);
  cr_assert_eq(s.retried, 100);
  cr_assert_eq(s.failed, 0);
  cr_assert_eq(s.pending + s.waiting + s.running, 0);
  cr_assert_eq(s.concurrency, 4);
  cr_assert_gt(s.wait.max_us, 0.0);
  cr_assert_geq(s.wait.p99_us, s.wait.p50_us);
  cr_assert_leq(s.wait.p99_us, s.wait.max_us);
  cr_assert_leq(s.run.p50_us, s.run.max_us);
  cr_assert_geq(s.jobs_per_second, 0.0);
  finish(h);
}

Test(queue, invalid_input) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  keel_queue *q = (keel_queue *)0x1;
  char why[128] = "";
  cr_assert_eq(keel_queue_new_ex(&loop, NULL, &o, &q, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "a process function is required");
  o.concurrency = 0;
  cr_assert_eq(keel_queue_new_ex(&loop, process, &o, &q, why, sizeof why), UV_EINVAL);
  cr_assert_str_eq(why, "concurrency must be >= 1");
  char tiny[8];
  cr_assert_eq(keel_queue_new_ex(&loop, process, &o, &q, tiny, sizeof tiny), UV_EINVAL);
  cr_assert_str_eq(tiny, "concurr", "truncated, terminated");
  cr_assert_eq(keel_queue_new_ex(&loop, process, &o, &q, NULL, 0), UV_EINVAL);
  keel_queue_opts_init(&o);
  keel_backoff_exponential(&o.retry_backoff, 100, -1, 0); /* FIXED ignores the factor */
  cr_assert_eq(keel_queue_new(&loop, process, &o, &q), UV_EINVAL);
  cr_assert_eq(keel_queue_new(&loop, process, NULL, &q), UV_EINVAL);
  cr_assert_eq(q, (keel_queue *)0x1);
  cr_assert_eq(keel_queue_push(NULL, NULL, 0, NULL), UV_EINVAL);
  cr_assert_eq(keel_queue_cancel(NULL, 1), UV_EINVAL);
  cr_assert_eq(keel_queue_push_threadsafe(NULL, NULL, 0), UV_EINVAL);
  keel_queue_close(NULL, NULL, NULL);
  kt_loop_finish(&loop);
}

Test(queue, allocation_failure_never_loses_accepted_work) {
  kt_alloc_install();
  for (int64_t n = 0; n < 12; n++) {
    harness *h = setup();
    h->opts.on_drain = NULL;
    keel_queue *q = NULL;
    kt_alloc_fail_after(n);
    int rc = keel_queue_new(&h->loop, process, &h->opts, &q);
    int accepted = 0;
    if (rc == 0) {
      h->q = q;
      for (int i = 0; i < 10; i++)
        if (keel_queue_push(q, (void *)(intptr_t)i, i % 3, NULL) == 0) accepted++;
    } else {
      cr_assert_eq(rc, UV_ENOMEM);
    }
    kt_alloc_fail_after(-1);
    if (q != NULL) {
      uv_run(&h->loop, UV_RUN_DEFAULT);
      keel_queue_close(q, NULL, NULL);
    }
    kt_loop_finish(&h->loop);
    int released = 0;
    for (int i = 0; i < 10; i++) released += h->released[i];
    cr_assert_eq(released, accepted, "fail at %lld: every accepted job released once",
                 (long long)n);
    cr_assert_eq(kt_alloc_live_blocks(), 0, "fail at %lld: no leak", (long long)n);
    free(h);
  }
}
