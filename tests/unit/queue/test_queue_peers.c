/* What p-queue's and BullMQ's own tests expect of a job queue: clear(),
 * setPriority(), sizeBy({priority}), the "empty" and "idle" events and the
 * onEmpty / onIdle / onSizeLessThan waits, a pause that reports when the
 * active jobs have finished, the next retry delay in on_error, an injected
 * clock instead of sleeping, and the adaptive concurrency limit on a
 * simulated downstream. Real loop, injected clock. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "keel/queue.h"
#include "support/harness.h"

#define MAXJ 64

typedef struct h {
  uv_loop_t loop;
  keel_queue_opts opts;
  keel_queue *q;
  uint64_t now; /* injected clock */
  bool hold;
  int fail_first; /* attempts 1..fail_first fail */
  int fail_status;
  bool in_call; /* around keel calls: no callback may run */
  /* observations */
  int order[MAXJ * 4];
  int order_count;
  int runs; /* attempts started */
  keel_job *held[MAXJ];
  int held_count;
  int errors, cancels_seen, finals, completed, empties, drains;
  int released[MAXJ];
  int release_status[MAXJ];
  uint64_t delays[8];
  int delay_count;
  int timeouts;
  int whens[8];
  int when_status[8];
  int when_order[8];
  int when_seq;
  bool closed;
} h;

static uint64_t test_now(void *data) {
  return *(uint64_t *)data;
}

static void process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  h *t = data;
  cr_assert_not(t->in_call, "process inside a keel call");
  int v = (int)(intptr_t)payload;
  t->order[t->order_count++] = v;
  t->runs++;
  if (t->hold) {
    t->held[t->held_count++] = job;
    return;
  }
  keel_job_done(job, (int)keel_job_attempt(job) <= t->fail_first ? t->fail_status : 0);
}

static void on_error(keel_queue *q, keel_job *job, void *payload, int status, unsigned attempts,
                     bool final, void *data) {
  (void)job;
  (void)payload;
  (void)attempts;
  h *t = data;
  cr_assert_not(t->in_call, "on_error inside a keel call");
  t->errors++;
  if (status == UV_ECANCELED) t->cancels_seen++;
  if (status == UV_ETIMEDOUT) t->timeouts++;
  if (final) t->finals++;
  if (t->delay_count < 8) t->delays[t->delay_count++] = keel_queue_retry_delay_ms(q);
  if (final) cr_assert_eq(keel_queue_retry_delay_ms(q), 0);
}

static void on_complete(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)job;
  (void)payload;
  ((h *)data)->completed++;
}

static void release(keel_queue *q, void *payload, int status, void *data) {
  (void)q;
  h *t = data;
  cr_assert_not(t->in_call, "release inside a keel call");
  int v = (int)(intptr_t)payload;
  t->released[v]++;
  t->release_status[v] = status;
}

static void on_empty(keel_queue *q, void *data) {
  (void)q;
  h *t = data;
  t->empties++;
  t->order[t->order_count++] = -1; /* marks when "empty" came */
}

static void on_drain(keel_queue *q, void *data) {
  (void)q;
  h *t = data;
  t->drains++;
  t->order[t->order_count++] = -2;
}

static void setup(h *t) {
  memset(t, 0, sizeof *t);
  cr_assert_eq(uv_loop_init(&t->loop), 0);
  keel_queue_opts_init(&t->opts);
  t->opts.on_error = on_error;
  t->opts.on_complete = on_complete;
  t->opts.release = release;
  t->opts.on_empty = on_empty;
  t->opts.on_drain = on_drain;
  t->opts.data = t;
  t->opts.clock.now = test_now;
  t->opts.clock.data = &t->now;
  t->fail_status = UV_EIO;
}

static void start(h *t) {
  cr_assert_eq(keel_queue_new(&t->loop, process, &t->opts, &t->q), 0);
}

static void push(h *t, int v, int priority, uint64_t *id) {
  t->in_call = true;
  cr_assert_eq(keel_queue_push(t->q, (void *)(intptr_t)v, priority, id), 0);
  t->in_call = false;
}

static void spin(h *t) {
  for (int i = 0; i < 8; i++) uv_run(&t->loop, UV_RUN_NOWAIT);
}

static void on_closed(void *obj, void *data) {
  (void)obj;
  ((h *)data)->closed = true;
}

static void finish(h *t) {
  keel_queue_close(t->q, on_closed, t);
  for (int i = 0; i < t->held_count; i++)
    if (t->held[i] != NULL) keel_job_done(t->held[i], 0);
  uv_run(&t->loop, UV_RUN_DEFAULT);
  cr_assert(t->closed);
  cr_assert_eq(uv_loop_close(&t->loop), 0);
}

static void done_held(h *t, int i, int status) {
  keel_job *job = t->held[i];
  t->held[i] = NULL;
  cr_assert_eq(keel_job_done(job, status), 0);
}

/* ---- clear ---------------------------------------------------------------- */

Test(queue_peers, clear_cancels_pending_jobs_later_and_keeps_running_ones) {
  /* p-queue: ".clear()" empties the queue, running promises go on. */
  h t;
  setup(&t);
  t.hold = true;
  start(&t);
  for (int v = 1; v <= 5; v++) push(&t, v, 0, NULL);
  spin(&t);
  cr_assert_eq(t.held_count, 1);
  uint64_t n = 99;
  t.in_call = true;
  cr_assert_eq(keel_queue_clear(t.q, &n), 0);
  t.in_call = false;
  cr_expect_eq(n, 4);
  cr_expect_eq(t.released[2], 0, "nothing inside clear()");
  keel_queue_stats st;
  keel_queue_get_stats(t.q, &st);
  cr_expect_eq(st.pending, 0);
  cr_expect_eq(st.cancelled, 4);
  spin(&t);
  for (int v = 2; v <= 5; v++) {
    cr_expect_eq(t.released[v], 1);
    cr_expect_eq(t.release_status[v], UV_ECANCELED);
  }
  cr_expect_eq(t.cancels_seen, 4);
  cr_expect_eq(t.runs, 1, "no cleared job ran");
  done_held(&t, 0, 0);
  spin(&t);
  cr_expect_eq(t.released[1], 1);
  cr_expect_eq(t.release_status[1], 0);
  /* the queue keeps working after a clear */
  t.hold = false;
  push(&t, 6, 0, NULL);
  spin(&t);
  cr_expect_eq(t.release_status[6], 0);
  cr_expect_eq(t.released[6], 1);
  finish(&t);
}

Test(queue_peers, clear_takes_jobs_waiting_for_a_retry_and_cancelled_slots) {
  h t;
  setup(&t);
  t.fail_first = 1;
  keel_backoff_fixed(&t.opts.retry_backoff, 60000);
  t.opts.concurrency = 1;
  start(&t);
  uint64_t id3;
  push(&t, 1, 0, NULL);
  spin(&t);
  keel_queue_stats st;
  keel_queue_get_stats(t.q, &st);
  cr_assert_eq(st.waiting, 1, "job 1 waits for its retry");
  cr_assert_eq(keel_queue_pause(t.q), 0);
  push(&t, 2, 0, NULL);
  push(&t, 3, 0, &id3);
  cr_assert_eq(keel_queue_cancel(t.q, id3), 0);
  uint64_t n;
  cr_assert_eq(keel_queue_clear(t.q, &n), 0);
  cr_expect_eq(n, 2, "the retry waiter and the pending job; the cancelled one is counted once");
  spin(&t);
  for (int v = 1; v <= 3; v++) {
    cr_expect_eq(t.released[v], 1, "job %d", v);
    cr_expect_eq(t.release_status[v], UV_ECANCELED);
  }
  keel_queue_get_stats(t.q, &st);
  cr_expect_eq(st.waiting, 0);
  cr_expect_eq(st.pending, 0);
  cr_expect_eq(st.cancelled, 3);
  t.now += 60000;
  keel_queue_tick(t.q);
  spin(&t);
  cr_expect_eq(t.runs, 1, "the cleared retry never runs");
  finish(&t);
}

/* ---- priorities ----------------------------------------------------------- */

Test(queue_peers, set_priority_moves_a_pending_job) {
  /* p-queue: ".setPriority() - execute a promise before planned". */
  h t;
  setup(&t);
  start(&t);
  cr_assert_eq(keel_queue_pause(t.q), 0);
  uint64_t ids[5];
  for (int v = 1; v <= 4; v++) push(&t, v, 0, &ids[v]);
  t.in_call = true;
  cr_assert_eq(keel_queue_set_priority(t.q, ids[4], 1), 0);
  cr_assert_eq(keel_queue_set_priority(t.q, ids[1], -1), 0, "after the others");
  cr_assert_eq(keel_queue_set_priority(t.q, ids[2], 0), 0, "same priority: no move");
  t.in_call = false;
  cr_expect_eq(keel_queue_count_priority(t.q, 0), 2);
  cr_expect_eq(keel_queue_count_priority(t.q, 1), 1);
  cr_expect_eq(keel_queue_count_priority(t.q, -1), 1);
  cr_assert_eq(keel_queue_resume(t.q), 0);
  spin(&t);
  int want[] = {4, 2, 3, 1};
  int got = 0;
  for (int i = 0; i < t.order_count; i++)
    if (t.order[i] > 0) cr_expect_eq(t.order[i], want[got++], "position %d", got);
  cr_expect_eq(got, 4);
  cr_expect_eq(keel_queue_set_priority(t.q, ids[4], 3), KEEL_ENOTFOUND, "finished");
  cr_expect_eq(keel_queue_set_priority(t.q, 12345, 3), KEEL_ENOTFOUND);
  cr_expect_eq(keel_queue_set_priority(NULL, 1, 3), UV_EINVAL);
  finish(&t);
}

Test(queue_peers, set_priority_of_a_running_or_retry_waiting_job) {
  h t;
  setup(&t);
  t.hold = true;
  keel_backoff_fixed(&t.opts.retry_backoff, 1000);
  start(&t);
  uint64_t id1;
  push(&t, 1, 0, &id1);
  spin(&t);
  cr_expect_eq(keel_queue_set_priority(t.q, id1, 5), KEEL_ENOTFOUND, "running");
  t.hold = false;
  t.fail_first = 0;
  done_held(&t, 0, UV_EIO); /* waits 1000 ms for its retry */
  cr_assert_eq(keel_queue_set_priority(t.q, id1, 5), 0, "waiting for a retry");
  t.hold = true;
  cr_assert_eq(keel_queue_pause(t.q), 0);
  push(&t, 2, 4, NULL);
  t.now += 1000;
  keel_queue_tick(t.q);
  spin(&t);
  cr_expect_eq(keel_queue_count_priority(t.q, 5), 1, "re-queued with its new priority");
  cr_expect_eq(keel_queue_count_priority(t.q, 0), 0);
  cr_assert_eq(keel_queue_resume(t.q), 0);
  spin(&t);
  int seen[2], k = 0;
  for (int i = 0; i < t.order_count && k < 2; i++)
    if (t.order[i] > 0 && i > 0) seen[k++] = t.order[i];
  cr_assert_eq(k, 1, "concurrency 1, held: one started");
  cr_expect_eq(seen[0], 1, "priority 5 before priority 4");
  finish(&t);
}

Test(queue_peers, counts_per_priority) {
  /* p-queue: ".sizeBy() - priority". */
  h t;
  setup(&t);
  start(&t);
  cr_assert_eq(keel_queue_pause(t.q), 0);
  uint64_t id;
  push(&t, 1, 1, NULL);
  push(&t, 2, 1, &id);
  push(&t, 3, 2, NULL);
  push(&t, 4, 0, NULL);
  push(&t, 5, 1, NULL);
  cr_expect_eq(keel_queue_count_priority(t.q, 1), 3);
  cr_expect_eq(keel_queue_count_priority(t.q, 2), 1);
  cr_expect_eq(keel_queue_count_priority(t.q, 7), 0);
  cr_assert_eq(keel_queue_cancel(t.q, id), 0);
  cr_expect_eq(keel_queue_count_priority(t.q, 1), 2, "a cancelled job is not counted");
  keel_queue_priority_count pc[2];
  size_t levels = keel_queue_priority_counts(t.q, pc, 2);
  cr_expect_eq(levels, 3);
  cr_expect_eq(pc[0].priority, 2);
  cr_expect_eq(pc[0].pending, 1);
  cr_expect_eq(pc[1].priority, 1);
  cr_expect_eq(pc[1].pending, 2);
  cr_expect_eq(keel_queue_priority_counts(t.q, NULL, 0), 3);
  cr_assert_eq(keel_queue_resume(t.q), 0);
  spin(&t);
  cr_expect_eq(keel_queue_count_priority(t.q, 1), 0);
  cr_expect_eq(keel_queue_priority_counts(t.q, pc, 2), 0);
  finish(&t);
}

/* ---- empty / idle / size-below waits -------------------------------------- */

static void when_cb(keel_queue *q, int status, void *data);
typedef struct when_ctx {
  h *t;
  int slot;
} when_ctx;

static void when_cb(keel_queue *q, int status, void *data) {
  (void)q;
  when_ctx *c = data;
  cr_assert_not(c->t->in_call, "a wait answered inside a keel call");
  c->t->whens[c->slot]++;
  c->t->when_status[c->slot] = status;
  c->t->when_order[c->slot] = ++c->t->when_seq;
}

Test(queue_peers, empty_then_idle_events_in_order) {
  /* p-queue: "should emit empty event when empty" and "idle" after the last
   * job finished; empty comes when the last pending job starts. */
  h t;
  setup(&t);
  t.hold = true;
  t.opts.concurrency = 2;
  start(&t);
  for (int v = 1; v <= 3; v++) push(&t, v, 0, NULL);
  spin(&t);
  cr_expect_eq(t.empties, 0, "one job still pending");
  cr_expect_eq(t.held_count, 2);
  done_held(&t, 0, 0);
  spin(&t);
  cr_expect_eq(t.held_count, 3);
  cr_expect_eq(t.empties, 1, "the last pending job started");
  cr_expect_eq(t.drains, 0, "two still run");
  done_held(&t, 1, 0);
  done_held(&t, 2, 0);
  spin(&t);
  cr_expect_eq(t.drains, 1);
  cr_expect_eq(t.empties, 1);
  /* order: 1 2 3 empty idle */
  cr_expect_eq(t.order[3], -1);
  cr_expect_eq(t.order[4], -2);
  finish(&t);
}

Test(queue_peers, when_empty_idle_and_size_below) {
  /* p-queue: onEmpty(), onIdle(), onSizeLessThan(n). */
  h t;
  setup(&t);
  t.hold = true;
  start(&t);
  when_ctx c[4] = {{&t, 0}, {&t, 1}, {&t, 2}, {&t, 3}};
  /* already true: answered on the next iteration, not inside */
  t.in_call = true;
  cr_assert_eq(keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, when_cb, &c[3]), 0);
  t.in_call = false;
  cr_expect_eq(t.whens[3], 0);
  spin(&t);
  cr_expect_eq(t.whens[3], 1);
  cr_expect_eq(t.when_status[3], 0);

  for (int v = 1; v <= 5; v++) push(&t, v, 0, NULL);
  spin(&t); /* 1 runs, 4 pending */
  cr_assert_eq(keel_queue_when(t.q, KEEL_QUEUE_SIZE_BELOW, 4, when_cb, &c[0]), 0);
  cr_assert_eq(keel_queue_when(t.q, KEEL_QUEUE_EMPTY, 0, when_cb, &c[1]), 0);
  cr_assert_eq(keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, when_cb, &c[2]), 0);
  spin(&t);
  cr_expect_eq(t.whens[0], 0, "4 pending is not below 4");
  done_held(&t, 0, 0);
  spin(&t);
  cr_expect_eq(t.whens[0], 1, "3 pending");
  cr_expect_eq(t.whens[1], 0);
  for (int i = 1; i <= 3; i++) {
    done_held(&t, i, 0);
    spin(&t);
  }
  cr_expect_eq(t.whens[1], 1, "the last job started");
  cr_expect_eq(t.whens[2], 0, "it still runs");
  done_held(&t, 4, 0);
  spin(&t);
  cr_expect_eq(t.whens[2], 1);
  cr_expect(t.when_order[0] < t.when_order[1] && t.when_order[1] < t.when_order[2]);
  for (int i = 0; i < 4; i++) cr_expect_eq(t.whens[i], 1, "exactly once: wait %d", i);
  cr_expect_eq(keel_queue_when(t.q, (keel_queue_condition)9, 0, when_cb, &c[0]), UV_EINVAL);
  cr_expect_eq(keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, NULL, NULL), UV_EINVAL);
  finish(&t);
}

Test(queue_peers, waits_get_ecanceled_on_close_before_the_close_callback) {
  h t;
  setup(&t);
  t.hold = true;
  start(&t);
  push(&t, 1, 0, NULL);
  spin(&t);
  when_ctx c = {&t, 0};
  cr_assert_eq(keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, when_cb, &c), 0);
  keel_queue_close(t.q, on_closed, &t);
  cr_expect_eq(t.whens[0], 0, "not inside close");
  cr_expect_eq(keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, when_cb, &c), KEEL_ECLOSING);
  spin(&t);
  cr_expect_eq(t.whens[0], 1);
  cr_expect_eq(t.when_status[0], UV_ECANCELED);
  cr_expect_not(t.closed, "the running job holds the close");
  done_held(&t, 0, 0);
  uv_run(&t.loop, UV_RUN_DEFAULT);
  cr_expect(t.closed);
  cr_expect_eq(t.whens[0], 1);
  cr_assert_eq(uv_loop_close(&t.loop), 0);
}

Test(queue_peers, pause_wait_reports_when_active_jobs_finished) {
  /* BullMQ: "pause() waits for the active jobs". */
  h t;
  setup(&t);
  t.hold = true;
  t.opts.concurrency = 2;
  start(&t);
  for (int v = 1; v <= 4; v++) push(&t, v, 0, NULL);
  spin(&t);
  cr_assert_eq(t.held_count, 2);
  when_ctx c = {&t, 0};
  t.in_call = true;
  cr_assert_eq(keel_queue_pause_wait(t.q, when_cb, &c), 0);
  t.in_call = false;
  spin(&t);
  cr_expect_eq(t.whens[0], 0);
  done_held(&t, 0, 0);
  spin(&t);
  cr_expect_eq(t.whens[0], 0, "one still active");
  cr_expect_eq(t.held_count, 2, "paused: nothing new started");
  done_held(&t, 1, 0);
  spin(&t);
  cr_expect_eq(t.whens[0], 1);
  cr_expect_eq(t.when_status[0], 0);
  keel_queue_stats st;
  keel_queue_get_stats(t.q, &st);
  cr_expect(st.paused);
  cr_expect_eq(st.pending, 2);
  finish(&t);
}

Test(queue_peers, pause_wait_counts_a_timed_out_attempt_until_it_reports) {
  h t;
  setup(&t);
  t.hold = true;
  t.opts.timeout_ms = 100;
  t.opts.max_retries = 0;
  start(&t);
  push(&t, 1, 0, NULL);
  spin(&t);
  when_ctx c = {&t, 0};
  cr_assert_eq(keel_queue_pause_wait(t.q, when_cb, &c), 0);
  t.now += 100;
  keel_queue_tick(t.q);
  spin(&t);
  cr_expect_eq(t.timeouts, 1);
  cr_expect_eq(t.whens[0], 0, "the timed-out attempt has not called done");
  keel_job *job = t.held[0];
  t.held[0] = NULL;
  cr_expect_eq(keel_job_done(job, 0), KEEL_ESTALE);
  spin(&t);
  cr_expect_eq(t.whens[0], 1);
  finish(&t);
}

/* ---- retries and the clock ------------------------------------------------ */

Test(queue_peers, on_error_sees_the_next_retry_delay) {
  /* BullMQ: the failed job's next delay; exponential 100 ms x2. */
  h t;
  setup(&t);
  t.fail_first = 100;
  t.opts.max_retries = 2;
  keel_backoff_exponential(&t.opts.retry_backoff, 100, 2.0, 0);
  start(&t);
  push(&t, 1, 0, NULL);
  spin(&t);
  cr_assert_eq(t.delay_count, 1);
  cr_expect_eq(t.delays[0], 100);
  t.now += 100;
  keel_queue_tick(t.q);
  spin(&t);
  cr_assert_eq(t.delay_count, 2);
  cr_expect_eq(t.delays[1], 200);
  t.now += 200;
  keel_queue_tick(t.q);
  spin(&t);
  cr_assert_eq(t.delay_count, 3);
  cr_expect_eq(t.delays[2], 0, "final: no retry");
  cr_expect_eq(t.finals, 1);
  cr_expect_eq(keel_queue_retry_delay_ms(t.q), 0, "outside on_error");
  finish(&t);
}

Test(queue_peers, injected_clock_drives_retries_without_sleeping) {
  h t;
  setup(&t);
  t.fail_first = 1;
  keel_backoff_fixed(&t.opts.retry_backoff, 3600000); /* an hour */
  start(&t);
  push(&t, 1, 0, NULL);
  spin(&t);
  cr_assert_eq(t.runs, 1);
  t.now += 3599999;
  cr_assert_eq(keel_queue_tick(t.q), 0);
  spin(&t);
  cr_expect_eq(t.runs, 1, "not yet due");
  t.now += 1;
  t.in_call = true;
  cr_assert_eq(keel_queue_tick(t.q), 0);
  t.in_call = false;
  spin(&t);
  cr_expect_eq(t.runs, 2, "due: retried");
  cr_expect_eq(t.release_status[1], 0);
  cr_expect_eq(keel_queue_tick(NULL), UV_EINVAL);
  finish(&t);
}

Test(queue_peers, injected_clock_drives_timeouts) {
  h t;
  setup(&t);
  t.hold = true;
  t.opts.timeout_ms = 5000;
  t.opts.max_retries = 0;
  start(&t);
  push(&t, 1, 0, NULL);
  spin(&t);
  t.now += 4999;
  keel_queue_tick(t.q);
  spin(&t);
  cr_expect_eq(t.timeouts, 0);
  t.now += 1;
  keel_queue_tick(t.q);
  spin(&t);
  cr_expect_eq(t.timeouts, 1);
  cr_expect_eq(t.release_status[1], UV_ETIMEDOUT);
  finish(&t);
}

/* ---- adaptive concurrency ------------------------------------------------- */

#define SIM_BASE 100u /* ms on the injected clock */
#define SIM_KNEE 40u

typedef struct sim {
  uv_loop_t loop;
  keel_queue *q;
  uint64_t now;
  keel_job *jobs[1024];
  uint64_t end[1024];
  unsigned n;
  unsigned max_running;
  uint32_t limit_min, limit_max;
  unsigned completed;
  bool measuring;
  uint64_t pushed;
} sim;

static void sim_process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q;
  (void)payload;
  sim *s = data;
  cr_assert_lt(s->n, 1024);
  s->jobs[s->n] = job;
  unsigned inflight = s->n + 1;
  s->end[s->n] = s->now + (inflight <= SIM_KNEE ? SIM_BASE : SIM_BASE * inflight / SIM_KNEE);
  s->n++;
  if (s->n > s->max_running && s->measuring) s->max_running = s->n;
}

static uint64_t sim_now(void *data) {
  return ((sim *)data)->now;
}

Test(queue_peers, adaptive_limit_settles_on_a_simulated_downstream) {
  sim s;
  memset(&s, 0, sizeof s);
  cr_assert_eq(uv_loop_init(&s.loop), 0);
  keel_adaptive_opts ao;
  keel_adaptive_opts_init(&ao);
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.concurrency = 1000;
  o.adaptive = &ao;
  o.data = &s;
  o.clock.now = sim_now;
  o.clock.data = &s;
  cr_assert_eq(keel_queue_new(&s.loop, sim_process, &o, &s.q), 0);
  s.limit_min = UINT32_MAX;
  for (int step = 0; step < 6000; step++) {
    while (s.pushed - s.completed < 2000) {
      cr_assert_eq(keel_queue_push(s.q, NULL, 0, NULL), 0);
      s.pushed++;
    }
    uv_run(&s.loop, UV_RUN_NOWAIT);
    uv_run(&s.loop, UV_RUN_NOWAIT);
    cr_assert_gt(s.n, 0);
    uint64_t next = UINT64_MAX;
    for (unsigned i = 0; i < s.n; i++)
      if (s.end[i] < next) next = s.end[i];
    s.now = next;
    for (unsigned i = 0; i < s.n;) {
      if (s.end[i] <= s.now) {
        keel_job *job = s.jobs[i];
        s.jobs[i] = s.jobs[s.n - 1];
        s.end[i] = s.end[s.n - 1];
        s.n--;
        cr_assert_eq(keel_job_done(job, 0), 0);
        s.completed++;
      } else {
        i++;
      }
    }
    keel_queue_stats st;
    keel_queue_get_stats(s.q, &st);
    if (step >= 3000) {
      s.measuring = true;
      if (st.limit < s.limit_min) s.limit_min = (uint32_t)st.limit;
      if (st.limit > s.limit_max) s.limit_max = (uint32_t)st.limit;
    }
  }
  cr_expect_geq(s.limit_min, 30, "limit fell to %u", s.limit_min);
  cr_expect_leq(s.limit_max, 50, "limit rose to %u", s.limit_max);
  cr_expect_leq(s.max_running, 50);
  keel_queue_close(s.q, NULL, NULL);
  for (unsigned i = 0; i < s.n; i++) keel_job_done(s.jobs[i], 0);
  uv_run(&s.loop, UV_RUN_DEFAULT);
  cr_assert_eq(uv_loop_close(&s.loop), 0);
}

Test(queue_peers, bad_adaptive_options_are_rejected) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_adaptive_opts ao;
  keel_adaptive_opts_init(&ao);
  ao.min_limit = 0;
  keel_queue_opts o;
  keel_queue_opts_init(&o);
  o.adaptive = &ao;
  keel_queue *q = (keel_queue *)&o;
  char why[128];
  cr_expect_eq(keel_queue_new_ex(&loop, sim_process, &o, &q, why, sizeof why), UV_EINVAL);
  cr_expect(strstr(why, "min_limit") != NULL, "%s", why);
  cr_expect_eq(q, (keel_queue *)&o);
  cr_assert_eq(uv_loop_close(&loop), 0);
}

/* ---- allocation failure ---------------------------------------------------- */

static void alloc_scenario(void *arg) {
  (void)arg;
  h t;
  setup(&t);
  t.hold = true;
  keel_adaptive_opts ao;
  keel_adaptive_opts_init(&ao);
  t.opts.adaptive = &ao;
  t.opts.concurrency = 1;
  if (keel_queue_new(&t.loop, process, &t.opts, &t.q) != 0) {
    cr_assert_eq(uv_loop_close(&t.loop), 0);
    return;
  }
  int pushed = 0;
  for (int v = 1; v <= 3; v++)
    if (keel_queue_push(t.q, (void *)(intptr_t)v, v, NULL) == 0) pushed++;
  when_ctx c = {&t, 0};
  int wrc = keel_queue_when(t.q, KEEL_QUEUE_IDLE, 0, when_cb, &c);
  spin(&t);
  uint64_t n = 0;
  int crc = keel_queue_clear(t.q, &n);
  spin(&t);
  finish(&t);
  int released = 0;
  for (int v = 1; v <= 3; v++) {
    cr_assert_leq(t.released[v], 1);
    released += t.released[v];
  }
  cr_assert_eq(released, pushed, "every accepted job released exactly once");
  if (wrc == 0) cr_assert_eq(t.whens[0], 1, "the wait answered exactly once");
  (void)crc;
}

Test(queue_peers, allocation_failure) {
  kt_failmalloc_run(alloc_scenario, NULL);
}
