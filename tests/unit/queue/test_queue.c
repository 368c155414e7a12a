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
  /* Concurrency, not slicing, is under test: a slice must not end by time
   * on a loaded machine before the few jobs here have started. */
  h->opts.slice_us = 10u * 1000u * 1000u;
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
  cr_assert_eq(h->released[3], 0, "nothing is called inside cancel");
  cr_assert_eq(h->errors, 1);
  cr_assert_eq(keel_queue_cancel(h->q, pending_id), KEEL_ENOTFOUND, "gone");
  cr_assert_eq(keel_queue_cancel(h->q, waiting_id), 0, "waiting for retry");
  cr_assert_eq(h->released[1], 0, "nothing is called inside cancel");
  cr_assert_eq(keel_queue_cancel(h->q, 12345678), KEEL_ENOTFOUND, "unknown");
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->released[3], 1);
  cr_assert_eq(h->release_status[3], UV_ECANCELED);
  cr_assert_eq(h->released[1], 1);
  cr_assert_eq(h->release_status[1], UV_ECANCELED);
  cr_assert_eq(h->errors, 3, "on_error for both cancellations");
  cr_assert_eq(h->finals, 2);
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

/* Slots of a big queue live in grouped blocks (1, 1, 2, ... then 64 chunks
 * of 4096 slots each): every job, in every group, keeps its own payload, and
 * an id from any group cancels exactly its job. */
typedef struct big_state {
  unsigned char *runs;
  int ran;
} big_state;

static void big_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  big_state *st = data;
  st->runs[(intptr_t)payload]++;
  st->ran++;
  keel_job_done(job, 0);
}

Test(queue, jobs_in_every_slab_group_keep_their_payload_and_id) {
  enum { N = 300000 }; /* 74 chunks: past the first 64-chunk group */
  uv_loop_t loop;
  uv_loop_init(&loop);
  big_state st = {.runs = calloc(N, 1)};
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 8;
  o.data = &st;
  keel_queue *q;
  cr_assert_eq(keel_queue_new(&loop, big_process, &o, &q), 0);
  cr_assert_eq(keel_queue_pause(q), 0);
  static uint64_t ids[N];
  for (int i = 0; i < N; i++)
    cr_assert_eq(keel_queue_push(q, (void *)(intptr_t)i, i % 5, &ids[i]), 0);
  int cancelled = 0;
  for (int i = 0; i < N; i += 997) {
    cr_assert_eq(keel_queue_cancel(q, ids[i]), 0, "job %d", i);
    cancelled++;
  }
  cr_assert_eq(keel_queue_resume(q), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(st.ran, N - cancelled);
  for (int i = 0; i < N; i++)
    cr_assert_eq(st.runs[i], i % 997 == 0 ? 0 : 1, "job %d ran %d times", i, st.runs[i]);
  keel_queue_close(q, NULL, NULL);
  kt_loop_finish(&loop);
  free(st.runs);
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

/* Issue 13 #4: pushers that keep pushing while the loop closes the queue
 * (not joined before close). Every accepted push runs or is released with
 * UV_ECANCELED, every thread sees KEEL_ECLOSING, and the memory stays valid
 * for the pushers until the close callback returned (ASan checks). */
enum { RACE_THREADS = 3, RACE_ROUNDS = 25 };

typedef struct race_pusher {
  keel_queue *q;
  long accepted;
  long full;
  bool saw_closing;
  uv_thread_t thread;
} race_pusher;

typedef struct race_state {
  race_pusher pushers[RACE_THREADS];
  long ran, cancelled, other_release;
  int close_after; /* close from inside process after this many jobs; < 0: from a timer */
  bool closed;
  uv_timer_t timer;
} race_state;

static void race_thread(void *arg) {
  race_pusher *p = arg;
  for (;;) {
    int rc = keel_queue_push_threadsafe(p->q, (void *)(intptr_t)1, 0);
    if (rc == 0) {
      p->accepted++;
    } else if (rc == KEEL_ECLOSING) {
      p->saw_closing = true;
      return;
    } else {
      cr_assert_eq(rc, KEEL_EFULL, "unexpected %d", rc);
      p->full++;
    }
  }
}

static void race_closed(void *object, void *data) {
  race_state *r = data;
  /* The documented place to stop pushing threads: q is still valid. */
  cr_assert_eq(keel_queue_push_threadsafe(object, NULL, 0), KEEL_ECLOSING);
  for (int t = 0; t < RACE_THREADS; t++) uv_thread_join(&r->pushers[t].thread);
  r->closed = true;
}

static void race_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)payload;
  race_state *r = data;
  r->ran++;
  keel_job_done(job, 0);
  if (r->close_after >= 0 && r->ran == r->close_after) keel_queue_close(q, race_closed, r);
}

static void race_release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  (void)payload;
  race_state *r = data;
  if (status == UV_ECANCELED)
    r->cancelled++;
  else if (status != 0)
    r->other_release++;
}

static void race_timer(uv_timer_t *timer) {
  race_state *r = timer->data;
  keel_queue_close(r->pushers[0].q, race_closed, r);
  uv_close((uv_handle_t *)timer, NULL);
}

Test(queue, threadsafe_push_racing_with_close_loses_nothing, .timeout = 120) {
  for (int round = 0; round < RACE_ROUNDS; round++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    race_state *r = calloc(1, sizeof *r);
    r->close_after = round % 2 ? 1 + round * 37 : -1;
    keel_queue_opts o;
    keel_queue_opts_init(&o);
    o.concurrency = 4;
    o.release = race_release;
    o.data = r;
    keel_queue *q;
    cr_assert_eq(keel_queue_new(&loop, race_process, &o, &q), 0);
    uv_timer_init(&loop, &r->timer);
    r->timer.data = r;
    for (int t = 0; t < RACE_THREADS; t++) {
      r->pushers[t].q = q;
      uv_thread_create(&r->pushers[t].thread, race_thread, &r->pushers[t]);
    }
    if (r->close_after < 0)
      uv_timer_start(&r->timer, race_timer, (uint64_t)(round % 5), 0);
    else
      uv_timer_start(&r->timer, race_timer, 2000, 0); /* fallback */
    while (!r->closed) uv_run(&loop, UV_RUN_ONCE);
    if (!uv_is_closing((uv_handle_t *)&r->timer)) uv_close((uv_handle_t *)&r->timer, NULL);
    kt_loop_finish(&loop);
    long accepted = 0;
    for (int t = 0; t < RACE_THREADS; t++) {
      accepted += r->pushers[t].accepted;
      cr_assert(r->pushers[t].saw_closing, "round %d: every pusher saw KEEL_ECLOSING", round);
    }
    cr_assert_eq(r->other_release, 0);
    cr_assert_eq(r->ran + r->cancelled, accepted,
                 "round %d: every accepted push ran or was cancelled (%ld + %ld vs %ld)", round,
                 r->ran, r->cancelled, accepted);
    free(r);
  }
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
  cr_assert_eq(h->released[1] + h->released[4], 0, "nothing is released inside close");
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)5, 0, NULL), KEEL_ECLOSING);
  uv_run(&h->loop, UV_RUN_NOWAIT);
  cr_assert_eq(h->released[1], 1, "waiting job released after close");
  cr_assert_eq(h->release_status[1], UV_ECANCELED);
  cr_assert_eq(h->released[4], 1, "pending job released after close");
  cr_assert_eq(h->release_status[4], UV_ECANCELED);
  cr_assert_eq(h->released[2], 0, "running jobs are released when they report");
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

/* ---- issue 13 ------------------------------------------------------------ */

/* #8: a million synchronous jobs are dispatched in slices: a due timer runs
 * between two slices, and the loop iterates at least once per slice. */
typedef struct slice_state {
  uint64_t ran;
  uint64_t ran_when_timer_fired;
  bool timer_fired;
  uint64_t iterations_with_work;
  keel_queue *q;
} slice_state;

static void slice_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  ((slice_state *)data)->ran++;
  keel_job_done(job, 0);
}

static void slice_timer(uv_timer_t *timer) {
  slice_state *st = timer->data;
  st->timer_fired = true;
  st->ran_when_timer_fired = st->ran;
}

/* A prepare handle runs after the idle phase (where the queue dispatches)
 * and before the loop computes its poll timeout. */
static void slice_check(uv_prepare_t *check) {
  slice_state *st = check->data;
  keel_queue_stats s;
  keel_queue_get_stats(st->q, &s);
  if (s.pending > 0)
    st->iterations_with_work++;
  else
    uv_prepare_stop(check);
}

Test(queue, dispatch_yields_to_the_loop_between_slices) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  slice_state st = {0};
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 100;
  o.data = &st;
  cr_assert_eq(keel_queue_new(&loop, slice_process, &o, &st.q), 0);
  enum { N = 1000000 };
  for (int i = 0; i < N; i++) cr_assert_eq(keel_queue_push(st.q, NULL, i % 3, NULL), 0);
  uv_timer_t timer;
  uv_timer_init(&loop, &timer);
  timer.data = &st;
  uv_timer_start(&timer, slice_timer, 0, 0);
  uv_prepare_t check;
  uv_prepare_init(&loop, &check);
  check.data = &st;
  uv_prepare_start(&check, slice_check);
  uv_run(&loop, UV_RUN_DEFAULT);
  cr_assert_eq(st.ran, N);
  cr_assert(st.timer_fired);
  cr_assert_lt(st.ran_when_timer_fired, N, "the timer ran before the queue was drained");
  cr_assert_leq(st.ran_when_timer_fired, KEEL_QUEUE_DEFAULT_SLICE_JOBS);
  cr_assert_geq(st.iterations_with_work, N / KEEL_QUEUE_DEFAULT_SLICE_JOBS - 1,
                "at most slice_jobs attempts per iteration");
  uv_close((uv_handle_t *)&timer, NULL);
  uv_close((uv_handle_t *)&check, NULL);
  keel_queue_close(st.q, NULL, NULL);
  kt_loop_finish(&loop);
  cr_assert_eq(o.slice_jobs, KEEL_QUEUE_DEFAULT_SLICE_JOBS);
  cr_assert_eq(o.slice_us, KEEL_QUEUE_DEFAULT_SLICE_US);
}

/* #8: an attempt that reports after its timeout passed (the loop was too
 * busy to fire the timer) is a timeout, never a success. */
static int overrun_done_rc;
static void overrun_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  uv_sleep(30); /* blocks the loop past the 10 ms timeout */
  overrun_done_rc = keel_job_done(job, 0);
}

Test(queue, an_attempt_reporting_after_its_timeout_is_a_timeout) {
  harness *h = setup();
  h->opts.timeout_ms = 10;
  h->opts.max_retries = 0;
  cr_assert_eq(keel_queue_new(&h->loop, overrun_process, &h->opts, &h->q), 0);
  keel_queue_push(h->q, (void *)(intptr_t)5, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(overrun_done_rc, KEEL_ESTALE);
  cr_assert_eq(h->completed, 0, "not a success");
  cr_assert_eq(h->finals, 1);
  cr_assert_eq(h->released[5], 1);
  cr_assert_eq(h->release_status[5], UV_ETIMEDOUT);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.timed_out, 1);
  cr_assert_eq(s.completed, 0);
  cr_assert_eq(s.failed, 1);
  finish(h);
}

/* #9: the attempt of the only job cannot be allocated: the queue must not
 * stall (on_drain comes, the job is retried and completes). */
static void null_error(keel_queue *q, keel_job *job, void *payload, int status, unsigned attempts,
                       bool final, void *data) {
  (void)q;
  (void)payload;
  (void)attempts;
  harness *h = data;
  h->errors++;
  if (final) h->finals++;
  cr_assert_null(job, "no attempt handle when none could be allocated");
  cr_assert_eq(status, UV_ENOMEM);
}

Test(queue, an_attempt_that_cannot_be_allocated_does_not_stall_the_queue) {
  kt_alloc_install();
  harness *h = setup();
  h->opts.on_error = null_error;
  keel_backoff_fixed(&h->opts.retry_backoff, 1);
  cr_assert_eq(keel_queue_new(&h->loop, done_at_once, &h->opts, &h->q), 0);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)1, 0, NULL), 0);
  kt_alloc_fail_nth(0); /* the attempt handle of the first start */
  uv_run(&h->loop, UV_RUN_DEFAULT);
  kt_alloc_fail_nth(-1);
  cr_assert_eq(h->errors, 1, "the attempt failed with UV_ENOMEM");
  cr_assert_eq(h->completed, 1, "and its retry completed");
  cr_assert_eq(h->drains, 1, "on_drain came");
  cr_assert_eq(h->released[1], 1);
  cr_assert_eq(h->release_status[1], 0);
  finish(h);
}

/* #12: attempts are counted as far as max_retries goes (70000 > 16 bits). */
static unsigned long long big_attempts;
static void always_fails(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  (void)data;
  big_attempts++;
  cr_assert_eq(keel_job_attempt(job), big_attempts, "attempt number %llu", big_attempts);
  cr_assert_leq(big_attempts, 70001, "the job never failed finally");
  keel_job_done(job, UV_EIO);
}

Test(queue, max_retries_beyond_16_bits_ends_after_exactly_that_many, .timeout = 120) {
  harness *h = setup();
  h->opts.max_retries = 70000;
  h->opts.on_drain = NULL;
  keel_backoff_fixed(&h->opts.retry_backoff, 0);
  cr_assert_eq(keel_queue_new(&h->loop, always_fails, &h->opts, &h->q), 0);
  keel_queue_push(h->q, (void *)(intptr_t)2, 0, NULL);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(big_attempts, 70001);
  cr_assert_eq(h->finals, 1);
  cr_assert_eq(h->released[2], 1);
  cr_assert_eq(h->release_status[2], UV_EIO);
  finish(h);
  /* What the counter cannot hold is refused, with the reason. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.max_retries = UINT32_MAX;
  keel_queue *q = NULL;
  char why[128];
  cr_assert_eq(keel_queue_new_ex(&loop, process, &o, &q, why, sizeof why), UV_EINVAL);
  cr_assert_null(q);
  cr_assert(strstr(why, "max_retries") != NULL, "%s", why);
  o.max_retries = UINT32_MAX - 1;
  cr_assert_eq(keel_queue_new(&loop, process, &o, &q), 0);
  keel_queue_close(q, NULL, NULL);
  kt_loop_finish(&loop);
}

/* Contract: after close began every call returns KEEL_ECLOSING; close and
 * cancel never call back inside the call; dropped jobs get UV_ECANCELED
 * before the close callback; the close callback comes once, last. */
static int contract_close_cbs;
static int released_at_close_cb;
static void contract_closed(void *object, void *data) {
  harness *h = data;
  cr_assert_not_null(object);
  contract_close_cbs++;
  released_at_close_cb = 0;
  for (int i = 0; i < 8; i++) released_at_close_cb += h->released[i];
}

Test(queue, calls_after_close_began_return_ECLOSING_and_nothing_runs_inside_close) {
  harness *h = setup();
  h->opts.max_retries = 5;
  keel_backoff_fixed(&h->opts.retry_backoff, 60000);
  h->fail_times = 1;
  create(h);
  uint64_t id1 = 0, id2 = 0;
  keel_queue_push(h->q, (void *)(intptr_t)1, 0, &id1); /* fails, then waits 60 s */
  uv_run(&h->loop, UV_RUN_NOWAIT);
  keel_queue_pause(h->q);
  keel_queue_push(h->q, (void *)(intptr_t)2, 0, &id2); /* pending */
  keel_queue_push(h->q, (void *)(intptr_t)3, 0, NULL); /* pending */
  cr_assert_eq(keel_queue_cancel(h->q, id2), 0);       /* reported on the next iteration */
  int errors_before = h->errors;
  contract_close_cbs = 0;
  keel_queue_close(h->q, contract_closed, h);
  keel_queue_close(h->q, contract_closed, h); /* a second close does nothing */
  cr_assert_eq(h->released[1] + h->released[2] + h->released[3], 0, "nothing inside close");
  cr_assert_eq(h->errors, errors_before);
  keel_queue_push_opts po;
  keel_queue_push_opts_init(&po);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)4, 0, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_push_ex(h->q, (void *)(intptr_t)4, &po, NULL), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_push_threadsafe(h->q, (void *)(intptr_t)4, 0), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_cancel(h->q, id1), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_pause(h->q), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_resume(h->q), KEEL_ECLOSING);
  cr_assert_eq(keel_queue_set_concurrency(h->q, 3), KEEL_ECLOSING);
  kt_loop_finish(&h->loop);
  cr_assert_eq(contract_close_cbs, 1);
  cr_assert_eq(released_at_close_cb, 3, "every release came before the close callback");
  cr_assert_eq(h->errors, errors_before + 1, "on_error only for the cancelled job");
  for (int i = 1; i <= 3; i++) {
    cr_assert_eq(h->released[i], 1, "job %d released once", i);
    cr_assert_eq(h->release_status[i], UV_ECANCELED, "job %d", i);
  }
  cr_assert_eq(h->released[4], 0);
  free(h);
}

/* Contract: close from inside each of the queue's callbacks. */
typedef enum close_site {
  CLOSE_IN_PROCESS,
  CLOSE_IN_PROCESS_THEN_DONE,
  CLOSE_IN_COMPLETE,
  CLOSE_IN_ERROR,
  CLOSE_IN_RELEASE,
  CLOSE_IN_DRAIN,
  CLOSE_SITES
} close_site;

typedef struct site_state {
  close_site site;
  keel_queue *q;
  keel_job *held;
  int released[4];
  int close_cbs;
  bool after_close_cb;
} site_state;

static void site_closed(void *object, void *data) {
  (void)object;
  site_state *st = data;
  st->close_cbs++;
  st->after_close_cb = true;
}

static void site_close(site_state *st) {
  keel_queue_close(st->q, site_closed, st);
  cr_assert_eq(st->close_cbs, 0, "the close callback never runs inside close");
}

static void site_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  site_state *st = data;
  cr_assert(!st->after_close_cb);
  int value = (int)(intptr_t)payload;
  if (st->site == CLOSE_IN_PROCESS && value == 0) {
    site_close(st);
    st->held = job; /* reported after close, from the test */
    return;
  }
  if (st->site == CLOSE_IN_PROCESS_THEN_DONE && value == 0) site_close(st);
  keel_job_done(job, value == 1 ? UV_EPERM : 0);
}

static void site_complete(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)job;
  (void)payload;
  site_state *st = data;
  if (st->site == CLOSE_IN_COMPLETE) site_close(st);
}

static void site_error(keel_queue *q, keel_job *job, void *payload, int status, unsigned attempts,
                       bool final, void *data) {
  (void)q;
  (void)job;
  (void)payload;
  (void)status;
  (void)attempts;
  (void) final;
  site_state *st = data;
  if (st->site == CLOSE_IN_ERROR) site_close(st);
}

static void site_release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  (void)status;
  site_state *st = data;
  cr_assert(!st->after_close_cb, "release after the close callback");
  st->released[(intptr_t)payload]++;
  if (st->site == CLOSE_IN_RELEASE) site_close(st);
}

static void site_drain(keel_queue *q, void *data) {
  (void)q;
  site_state *st = data;
  if (st->site == CLOSE_IN_DRAIN) site_close(st);
}

Test(queue, close_from_inside_every_callback) {
  for (int site = 0; site < CLOSE_SITES; site++) {
    uv_loop_t loop;
    uv_loop_init(&loop);
    site_state st = {.site = (close_site)site};
    keel_queue_opts o;
    keel_queue_opts_init(&o);
    o.max_retries = 0;
    o.on_complete = site_complete;
    o.on_error = site_error;
    o.release = site_release;
    o.on_drain = site_drain;
    o.data = &st;
    cr_assert_eq(keel_queue_new(&loop, site_process, &o, &st.q), 0);
    /* job 0 succeeds, job 1 fails (not retried), jobs 2 and 3 succeed */
    for (int i = 0; i < 4; i++)
      cr_assert_eq(keel_queue_push(st.q, (void *)(intptr_t)i, -i, NULL), 0);
    if (site == CLOSE_IN_DRAIN) {
      uv_run(&loop, UV_RUN_DEFAULT);
    } else {
      while (st.close_cbs == 0 && st.held == NULL) uv_run(&loop, UV_RUN_ONCE);
      if (st.held != NULL) {
        uv_run(&loop, UV_RUN_NOWAIT);
        cr_assert_eq(st.close_cbs, 0, "waits for the running attempt");
        cr_assert_eq(keel_job_done(st.held, 0), 0);
      }
    }
    kt_loop_finish(&loop);
    cr_assert_eq(st.close_cbs, 1, "site %d: close callback once", site);
    for (int i = 0; i < 4; i++)
      cr_assert_eq(st.released[i], 1, "site %d: job %d released once", site, i);
  }
}

/* Bounded memory: max_pending has a default, and counts jobs waiting for a
 * retry and cancelled jobs of a paused queue (their slots are only reclaimed
 * when the dispatcher passes them). */
Test(queue, max_pending_bounds_cancelled_and_waiting_jobs) {
  harness *h = setup();
  h->opts.max_pending = 4;
  create(h);
  keel_queue_pause(h->q);
  uint64_t ids[4];
  for (int i = 0; i < 4; i++)
    cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)i, 0, &ids[i]), 0);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)9, 0, NULL), KEEL_EFULL);
  cr_assert_eq(keel_queue_cancel(h->q, ids[0]), 0);
  cr_assert_eq(keel_queue_cancel(h->q, ids[1]), 0);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->released[0] + h->released[1], 2);
  /* Push and cancel in a loop on a paused queue: memory stays bounded. */
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)9, 0, NULL), KEEL_EFULL,
               "cancelled slots still count");
  keel_queue_resume(h->q);
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->completed, 2);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)9, 0, NULL), 0, "reclaimed");
  uv_run(&h->loop, UV_RUN_DEFAULT);
  finish(h);

  /* Jobs waiting for a retry count too. */
  h = setup();
  h->opts.max_pending = 2;
  h->fail_times = 1;
  keel_backoff_fixed(&h->opts.retry_backoff, 60000);
  create(h);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)1, 0, NULL), 0);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)2, 0, NULL), 0);
  uv_run(&h->loop, UV_RUN_NOWAIT); /* both failed once: waiting */
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.waiting, 2);
  cr_assert_eq(keel_queue_push(h->q, (void *)(intptr_t)3, 0, NULL), KEEL_EFULL);
  cr_assert_eq(keel_queue_push_threadsafe(h->q, (void *)(intptr_t)3, 0), KEEL_EFULL);
  finish(h);

  keel_queue_opts d;
  keel_queue_opts_init(&d);
  cr_assert_eq(d.max_pending, KEEL_QUEUE_DEFAULT_MAX_PENDING, "bounded by default");
}

Test(queue, abi_reserved_space_is_zero) {
  keel_queue_opts o;
  memset(&o, 0xAB, sizeof o);
  keel_queue_opts_init(&o);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_assert_eq(o.reserved_[i], 0);
  keel_queue_push_opts po;
  memset(&po, 0xAB, sizeof po);
  keel_queue_push_opts_init(&po);
  for (size_t i = 0; i < sizeof po.reserved_ / sizeof po.reserved_[0]; i++)
    cr_assert_eq(po.reserved_[i], 0);
  harness *h = setup();
  create(h);
  keel_queue_stats s;
  memset(&s, 0xAB, sizeof s);
  keel_queue_get_stats(h->q, &s);
  for (size_t i = 0; i < sizeof s.reserved_ / sizeof s.reserved_[0]; i++)
    cr_assert_eq(s.reserved_[i], 0);
  finish(h);
}

/* Allocation failure over the main paths: new, push (plain and with
 * overrides), run with retries and a timeout, cancel, close. No crash, no
 * leak, every accepted job released exactly once, every close callback
 * once, uv_loop_close() == 0 (kt_loop_finish). */
typedef struct fm_state {
  int released[16];
  int release_count;
  int close_cbs;
  int accepted[16];
} fm_state;

static void fm_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)data;
  int value = (int)(intptr_t)payload;
  /* Odd jobs fail their first attempt; job 5 runs past its timeout. */
  if (value == 5 && keel_job_attempt(job) == 1) {
    uv_sleep(3);
    keel_job_done(job, 0);
    return;
  }
  keel_job_done(job, (value & 1) && keel_job_attempt(job) == 1 ? UV_EIO : 0);
}

static void fm_release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  (void)status;
  fm_state *st = data;
  st->released[(intptr_t)payload]++;
  st->release_count++;
}

static void fm_closed(void *object, void *data) {
  (void)object;
  ((fm_state *)data)->close_cbs++;
}

static void fm_scenario(void *arg) {
  (void)arg;
  fm_state st = {0};
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 2;
  o.max_retries = 2;
  keel_backoff_fixed(&o.retry_backoff, 0);
  o.release = fm_release;
  o.data = &st;
  keel_queue *q = NULL;
  int rc = keel_queue_new(&loop, fm_process, &o, &q);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM);
    kt_loop_finish(&loop);
    return;
  }
  keel_queue_push_opts po;
  keel_queue_push_opts_init(&po);
  uint64_t ids[16] = {0};
  for (int i = 0; i < 12; i++) {
    po.priority = i % 4;
    po.timeout_ms = i == 5 ? 1 : 0;
    rc = i % 3 == 0 ? keel_queue_push(q, (void *)(intptr_t)i, i % 5, &ids[i])
                    : keel_queue_push_ex(q, (void *)(intptr_t)i, &po, &ids[i]);
    if (rc == 0)
      st.accepted[i] = 1;
    else
      cr_assert_eq(rc, UV_ENOMEM, "push %d: %d", i, rc);
  }
  if (st.accepted[11]) {
    rc = keel_queue_cancel(q, ids[11]);
    cr_assert(rc == 0 || rc == UV_ENOMEM, "cancel: %d", rc);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  keel_queue_close(q, fm_closed, &st);
  kt_loop_finish(&loop);
  cr_assert_eq(st.close_cbs, 1);
  for (int i = 0; i < 12; i++)
    cr_assert_eq(st.released[i], st.accepted[i], "fail at %lld: job %d released %d times",
                 (long long)kt_failmalloc_index(), i, st.released[i]);
}

Test(queue, allocation_failure_on_every_main_path) {
  kt_failmalloc_run(fm_scenario, NULL);
  cr_assert_gt(kt_failmalloc_count(), 5);
}

/* Many attempts running at once with their own timeouts, pushed with the
 * latest deadline first: the timeout heap grows past its first block and
 * reorders on every insert and removal; each attempt times out exactly
 * once, in deadline order. */
static int timeout_order[64];
static int timeout_order_count;

static void release_in_order(keel_queue *q, void *payload, int status, void *data) {
  release(q, payload, status, data);
  timeout_order[timeout_order_count++] = (int)(intptr_t)payload;
}

Test(queue, many_timeouts_fire_once_each_in_deadline_order) {
  harness *h = setup();
  h->opts.concurrency = 64;
  h->opts.max_retries = 0;
  h->opts.release = release_in_order;
  h->hold = true;
  timeout_order_count = 0;
  create(h);
  keel_queue_push_opts po;
  keel_queue_push_opts_init(&po);
  enum { N = 40 };
  for (int i = 0; i < N; i++) {
    /* job N-1 is due first; 15 ms apart so that jobs started a few ms
     * apart on a loaded machine still have deadlines in this order */
    po.timeout_ms = 10 + 15 * (uint64_t)(N - i);
    cr_assert_eq(keel_queue_push_ex(h->q, (void *)(intptr_t)(i + 1), &po, NULL), 0);
  }
  uv_run(&h->loop, UV_RUN_DEFAULT);
  cr_assert_eq(h->held_count, N, "every job started");
  cr_assert_eq(timeout_order_count, N);
  for (int i = 0; i < N; i++) {
    cr_assert_eq(timeout_order[i], N - i, "release %d was job %d", i, timeout_order[i]);
    cr_assert_eq(h->released[N - i], 1);
    cr_assert_eq(h->release_status[N - i], UV_ETIMEDOUT);
  }
  cr_assert_eq(h->finals, N);
  keel_queue_stats s;
  keel_queue_get_stats(h->q, &s);
  cr_assert_eq(s.timed_out, N);
  cr_assert_eq(s.running, 0);
  for (int i = 0; i < N; i++) cr_assert_eq(keel_job_done(h->held[i], 0), KEEL_ESTALE);
  h->held_count = 0;
  finish(h);
}

/* Job accessors and the queue's calls accept NULL. */
Test(queue, null_arguments) {
  cr_assert_eq(keel_job_id(NULL), 0);
  cr_assert_null(keel_job_payload(NULL));
  cr_assert_eq(keel_job_priority(NULL), 0);
  cr_assert_eq(keel_job_attempt(NULL), 0);
  cr_assert_eq(keel_queue_pause(NULL), UV_EINVAL);
  cr_assert_eq(keel_queue_cancel(NULL, 1), UV_EINVAL);
  cr_assert_eq(keel_queue_set_concurrency(NULL, 1), UV_EINVAL);
  cr_assert_eq(keel_queue_resume(NULL), UV_EINVAL);
  cr_assert_str_eq(keel_queue_last_error(NULL), "queue is NULL");
  keel_queue_opts_init(NULL);
  keel_queue_push_opts_init(NULL);
  keel_queue_stats s;
  memset(&s, 0x77, sizeof s);
  keel_queue_get_stats(NULL, &s);
  cr_assert_eq(s.reserved_[0], 0x7777777777777777ull, "untouched");
}
