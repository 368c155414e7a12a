/* The job queue's libuv adapter: dispatch (a trampoline, so synchronous
 * completions never recurse), attempts and their timeouts, retries on one
 * timer, the thread-safe push, statistics and close. The ordering and the
 * bookkeeping of jobs live in sched.c. */
#include <stdio.h>

#include "core/alloc.h"
#include "core/histogram.h"
#include "core/util.h"
#include "queue/queue_stats.h"
#include "keel/queue.h"
#include "queue/sched.h"

#include <stdatomic.h>

typedef enum run_state { RUN_FREE = 0, RUN_ACTIVE, RUN_TIMED_OUT } run_state;

/* One attempt. Its address is the keel_job handle users hold; it is never
 * reused while the user may still call keel_job_done() on it. */
struct keel_job {
  keel_queue *queue;
  keel_job *next_free;
  void *payload;
  uint64_t id;
  uint64_t started_ns;
  uint64_t deadline_ns; /* hrtime by which done must come; 0 = no timeout */
  uint64_t deadline_ms; /* the same in loop time, for the timeout timer */
  uint64_t started_ms;  /* queue clock at start (adaptive limit with an injected clock) */
  uint32_t slot;
  uint32_t timeout_pos; /* index in the timeout heap, KEEL__NIL when none */
  int priority;
  uint32_t attempt;
  uint8_t state;
};

/* A keel_queue_when() wait. */
typedef struct when_wait {
  keel_queue_condition condition;
  uint64_t n;
  keel_queue_when_cb cb;
  void *data;
} when_wait;

typedef struct threadsafe_push {
  void *payload;
  int priority;
} threadsafe_push;

/* A cancelled job whose on_error/release are still to be called (on the
 * next loop iteration, never inside keel_queue_cancel()). */
typedef struct cancel_note {
  void *payload;
  uint32_t attempts;
} cancel_note;

struct keel_queue {
  keel__stats_hooks stats_hooks; /* keel_serve registrations (serve.h) */
  uv_loop_t *loop;
  keel_queue_process_fn process;
  keel_queue_opts opts;
  keel__sched sched;
  keel_rng rng;
  unsigned running;
  unsigned timed_out_outstanding; /* attempts that timed out, done not yet called */
  bool paused;
  bool in_dispatch;
  /* Clock reads are the largest cost per job, so dispatch shares them: the
   * time read to start an attempt also ends the previous synchronous one
   * (completed inside process) and stamps pushes made from its callbacks. */
  bool sync_end_pending; /* a synchronous attempt's end awaits the next read */
  keel_job *current;     /* the attempt whose process() is running */
  uint64_t sync_start_ns;
  uint64_t now_ns; /* the dispatcher's last clock read */
  bool closing;
  bool drop_done; /* close: dropped jobs released, only the idle handle is left */
  bool idle_closing;
  bool drained_reported;

  uv_idle_t idle;           /* dispatches a slice per loop iteration while there is work */
  uv_timer_t retry_timer;   /* fires when the earliest retry is due */
  uv_timer_t timeout_timer; /* fires when the earliest attempt deadline passes */
  uv_async_t async;         /* thread-safe pushes */
  unsigned handles_open;

  keel_job *free_runs;
  uint32_t runs_allocated;
  keel_job **timeouts; /* min-heap by deadline_ms; capacity >= runs_allocated */
  uint32_t timeout_count, timeout_cap;

  cancel_note *notes;
  size_t note_count, note_cap;

  keel_adaptive *adaptive; /* opts.adaptive, NULL without */
  when_wait *whens;
  size_t when_count, when_cap;
  bool empty_reported;
  uint64_t error_retry_delay_ms; /* during on_error for a retried failure */

  /* Thread-safe pushes. ts_mutex guards ts_items, ts_count, ts_cap and
   * ts_closed, and is held across uv_async_send(). ts_inside counts callers
   * inside keel_queue_push_threadsafe(): the memory is freed only once it is
   * 0 and ts_closed is set. ts_held publishes the loop's held count for the
   * max_pending check of those pushes. */
  uv_mutex_t ts_mutex;
  threadsafe_push *ts_items;
  size_t ts_count, ts_cap;
  bool ts_closed;
  atomic_uint ts_inside;
  atomic_size_t ts_held;

  keel_queue_stats stats;
  keel__histogram wait_hist;
  keel__histogram run_hist;
  uint64_t rate_mark_ms;
  uint64_t rate_mark_completed;

  keel_close_cb close_cb;
  void *close_data;
  char last_error[KEEL__ERRBUF_SIZE];
};

static void kick(keel_queue *q);
static void maybe_close_idle(keel_queue *q);

/* The queue's clock (opts.clock, or the loop's time) in ms. */
static inline uint64_t qnow(const keel_queue *q) {
  return keel__clock_now(&q->opts.clock, q->loop);
}

/* Whether one more attempt may start: under concurrency, and under the
 * adaptive limit when there is one. */
static inline bool below_limit(const keel_queue *q) {
  return q->running < q->opts.concurrency &&
         (q->adaptive == NULL || keel_adaptive_has_room(q->adaptive));
}

/* Gives the attempt's adaptive slot back with its run time. Kept out of
 * line: the queue without an adaptive limit only pays the NULL test. */
#if defined(__GNUC__)
__attribute__((noinline, cold))
#endif
static void
adaptive_release(keel_queue *q, keel_job *run, uint64_t now_ns, keel_adaptive_outcome outcome) {
  uint64_t rtt;
  if (q->opts.clock.now != NULL) {
    uint64_t now = qnow(q);
    rtt = now > run->started_ms ? now - run->started_ms : 0;
  } else {
    if (now_ns == 0) now_ns = uv_hrtime();
    rtt = now_ns - run->started_ns;
  }
  keel_adaptive_release(q->adaptive, rtt, outcome);
}

void keel_queue_opts_init(keel_queue_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->concurrency = 1;
  opts->max_retries = 3;
  keel_backoff_fixed(&opts->retry_backoff, 1000);
  opts->max_pending = KEEL_QUEUE_DEFAULT_MAX_PENDING;
  opts->rate_interval_ms = 1000;
  opts->slice_jobs = KEEL_QUEUE_DEFAULT_SLICE_JOBS;
  opts->slice_us = KEEL_QUEUE_DEFAULT_SLICE_US;
}

void keel_queue_push_opts_init(keel_queue_push_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->max_retries = -1;
}

static int default_classify(int status, void *data) {
  (void)data;
  return status != UV_ECANCELED && status != UV_EINVAL && status != KEEL_EABORTED;
}

/* Jobs the queue holds that are not running: bounded by max_pending. */
static uint64_t held(const keel_queue *q) {
  return q->sched.pending + q->sched.cancelled + q->sched.heap_count;
}

static void publish_held(keel_queue *q) {
  atomic_store_explicit(&q->ts_held, (size_t)held(q), memory_order_relaxed);
}

/* ---- timeout heap ------------------------------------------------------- */

static void timeout_set(keel_queue *q, uint32_t pos, keel_job *run) {
  q->timeouts[pos] = run;
  run->timeout_pos = pos;
}

static void timeout_sift_up(keel_queue *q, uint32_t pos) {
  keel_job *run = q->timeouts[pos];
  while (pos > 0) {
    uint32_t parent = (pos - 1) / 2;
    if (q->timeouts[parent]->deadline_ms <= run->deadline_ms) break;
    timeout_set(q, pos, q->timeouts[parent]);
    pos = parent;
  }
  timeout_set(q, pos, run);
}

static void timeout_sift_down(keel_queue *q, uint32_t pos) {
  keel_job *run = q->timeouts[pos];
  for (;;) {
    uint32_t child = 2 * pos + 1;
    if (child >= q->timeout_count) break;
    if (child + 1 < q->timeout_count &&
        q->timeouts[child + 1]->deadline_ms < q->timeouts[child]->deadline_ms)
      child++;
    if (q->timeouts[child]->deadline_ms >= run->deadline_ms) break;
    timeout_set(q, pos, q->timeouts[child]);
    pos = child;
  }
  timeout_set(q, pos, run);
}

static void on_timeout_timer(uv_timer_t *timer);

static void arm_timeout_timer(keel_queue *q) {
  if (q->timeout_count == 0) {
    uv_timer_stop(&q->timeout_timer);
    return;
  }
  uint64_t now = qnow(q);
  uint64_t deadline = q->timeouts[0]->deadline_ms;
  uv_timer_start(&q->timeout_timer, on_timeout_timer, deadline > now ? deadline - now : 0, 0);
}

static int timeout_add(keel_queue *q, keel_job *run) {
  if (q->timeout_count == q->timeout_cap) {
    uint32_t cap = q->timeout_cap ? q->timeout_cap * 2 : 16;
    keel_job **heap = keel__realloc(q->timeouts, cap * sizeof *heap);
    if (heap == NULL) return UV_ENOMEM;
    q->timeouts = heap;
    q->timeout_cap = cap;
  }
  timeout_set(q, q->timeout_count++, run);
  timeout_sift_up(q, q->timeout_count - 1);
  if (run->timeout_pos == 0) arm_timeout_timer(q);
  return 0;
}

static void timeout_remove(keel_queue *q, keel_job *run) {
  uint32_t pos = run->timeout_pos;
  if (pos == KEEL__NIL) return;
  run->timeout_pos = KEEL__NIL;
  keel_job *last = q->timeouts[--q->timeout_count];
  if (pos != q->timeout_count) {
    timeout_set(q, pos, last);
    if (pos > 0 && q->timeouts[(pos - 1) / 2]->deadline_ms > last->deadline_ms)
      timeout_sift_up(q, pos);
    else
      timeout_sift_down(q, pos);
  }
  if (pos == 0) arm_timeout_timer(q);
}

/* ---- runs --------------------------------------------------------------- */

static keel_job *run_take(keel_queue *q) {
  keel_job *run = q->free_runs;
  if (run != NULL) {
    q->free_runs = run->next_free;
    return run;
  }
  /* A new handle: first make room for it in the timeout heap, so that arming
   * its timeout never needs memory. */
  if (q->timeout_cap <= q->runs_allocated) {
    uint32_t cap = q->timeout_cap ? q->timeout_cap * 2 : 16;
    keel_job **heap = keel__realloc(q->timeouts, cap * sizeof *heap);
    if (heap == NULL) return NULL;
    q->timeouts = heap;
    q->timeout_cap = cap;
  }
  run = keel__calloc(1, sizeof *run);
  if (run == NULL) return NULL;
  run->queue = q;
  q->runs_allocated++;
  return run;
}

static void run_put(keel_queue *q, keel_job *run) {
  run->state = RUN_FREE;
  run->next_free = q->free_runs;
  q->free_runs = run;
}

static void release_payload(keel_queue *q, void *payload, int status) {
  if (q->opts.release != NULL) q->opts.release(q, payload, status, q->opts.data);
}

static const keel__job_overrides *overrides_of(keel_queue *q, uint32_t slot) {
  return keel__sched_overrides(&q->sched, slot);
}

static uint64_t timeout_of(keel_queue *q, uint32_t slot) {
  const keel__job_overrides *ov = overrides_of(q, slot);
  if (ov != NULL && ov->timeout_ms != 0) return ov->timeout_ms == UINT64_MAX ? 0 : ov->timeout_ms;
  return q->opts.timeout_ms;
}

static void arm_retry_timer(keel_queue *q);
static void on_retry_timer(uv_timer_t *timer);

/* ---- outcome of an attempt ----------------------------------------------- */

static void finish_job(keel_queue *q, uint32_t index, int status) {
  keel__job_slot *slot = keel__slot(&q->sched, index);
  void *payload = slot->payload;
  keel__sched_release(&q->sched, index);
  release_payload(q, payload, status);
}

/* Decides what happens to a job after a failed attempt. run is NULL when no
 * attempt handle could be allocated (status UV_ENOMEM). */
static void attempt_failed(keel_queue *q, keel_job *run, uint32_t index, int status) {
  keel__job_slot *slot = keel__slot(&q->sched, index);
  const keel__job_overrides *ov = keel__sched_overrides(&q->sched, index);
  unsigned max_retries =
      ov != NULL && ov->max_retries >= 0 ? (unsigned)ov->max_retries : q->opts.max_retries;
  keel_queue_classify_fn classify = q->opts.classify ? q->opts.classify : default_classify;
  bool retry = !q->closing && slot->attempts <= max_retries && classify(status, q->opts.data);
  uint64_t delay = 0;
  if (retry) {
    /* Drawn before on_error, which can read it (keel_queue_retry_delay_ms). */
    const keel_backoff *backoff =
        ov != NULL && ov->has_backoff ? &ov->backoff : &q->opts.retry_backoff;
    delay = keel_backoff_delay(backoff, slot->attempts, slot->last_delay_ms, &q->rng);
  }
  if (q->opts.on_error != NULL) {
    q->error_retry_delay_ms = delay;
    q->opts.on_error(q, run, slot->payload, status, slot->attempts, !retry, q->opts.data);
    q->error_retry_delay_ms = 0;
  }
  if (!retry) {
    q->stats.failed++;
    finish_job(q, index, status);
    return;
  }
  slot->last_delay_ms = delay > UINT32_MAX ? UINT32_MAX : (uint32_t)delay;
  q->stats.retried++;
  keel__sched_wait(&q->sched, index, qnow(q) + delay);
  if (keel__sched_next_due(&q->sched) == index) arm_retry_timer(q);
}

static void attempt_ended(keel_queue *q, keel_job *run, int status) {
  q->running--;
  if (status == 0) {
    q->stats.completed++;
    uint64_t now_ms = uv_now(q->loop); /* the rate is on loop time, not opts.clock */
    if (now_ms - q->rate_mark_ms >= q->opts.rate_interval_ms) {
      uint64_t elapsed = now_ms - q->rate_mark_ms;
      q->stats.jobs_per_second =
          (double)(q->stats.completed - q->rate_mark_completed) * 1000.0 / (double)elapsed;
      q->rate_mark_ms = now_ms;
      q->rate_mark_completed = q->stats.completed;
    }
    keel__job_slot *slot = keel__slot(&q->sched, run->slot);
    if (q->opts.on_complete != NULL) q->opts.on_complete(q, run, slot->payload, q->opts.data);
    finish_job(q, run->slot, 0);
  } else {
    attempt_failed(q, run, run->slot, status);
  }
}

int keel_job_done(keel_job *run, int status) {
  if (run == NULL) return UV_EINVAL;
  keel_queue *q = run->queue;
  if (run->state == RUN_TIMED_OUT) {
    q->timed_out_outstanding--;
    run_put(q, run);
    if (q->closing)
      maybe_close_idle(q);
    else if (q->when_count != 0)
      kick(q); /* KEEL_QUEUE_NONE_RUNNING may hold now */
    return KEEL_ESTALE;
  }
  if (run->state != RUN_ACTIVE) return UV_EINVAL;
  if (status > 0) status = 0;
  int rc = 0;
  if (q->adaptive != NULL)
    adaptive_release(q, run, 0,
                     status == UV_ECANCELED ? KEEL_ADAPTIVE_IGNORE : KEEL_ADAPTIVE_SUCCESS);
  if (run == q->current && run->deadline_ns == 0) {
    /* Done inside its process(): timed by the dispatcher's next read. */
    q->sync_start_ns = run->started_ns;
    q->sync_end_pending = true;
  } else {
    uint64_t now_ns = uv_hrtime();
    keel__histogram_record(&q->run_hist, now_ns - run->started_ns);
    timeout_remove(q, run);
    bool late = q->opts.clock.now != NULL ? run->deadline_ns != 0 && qnow(q) >= run->deadline_ms
                                          : run->deadline_ns != 0 && now_ns >= run->deadline_ns;
    if (late) {
      /* The deadline passed before the timer could fire (the loop was busy):
       * a timeout all the same, whatever the status says. */
      q->stats.timed_out++;
      status = UV_ETIMEDOUT;
      rc = KEEL_ESTALE;
    }
  }
  attempt_ended(q, run, status);
  run_put(q, run);
  if (q->closing)
    maybe_close_idle(q);
  else if (!q->in_dispatch)
    kick(q);
  return rc;
}

static void on_timeout_timer(uv_timer_t *timer) {
  keel_queue *q = timer->data;
  uint64_t now = qnow(q);
  while (!q->closing && q->timeout_count > 0 && q->timeouts[0]->deadline_ms <= now) {
    keel_job *run = q->timeouts[0];
    timeout_remove(q, run);
    run->state = RUN_TIMED_OUT; /* the late keel_job_done() frees it */
    q->timed_out_outstanding++;
    q->stats.timed_out++;
    uint64_t now_ns = uv_hrtime();
    keel__histogram_record(&q->run_hist, now_ns - run->started_ns);
    if (q->adaptive != NULL) adaptive_release(q, run, now_ns, KEEL_ADAPTIVE_DROPPED);
    attempt_ended(q, run, UV_ETIMEDOUT);
  }
  arm_timeout_timer(q);
  kick(q);
}

/* ---- dispatch ----------------------------------------------------------- */

static void check_drain(keel_queue *q) {
  if (q->sched.pending != 0 || q->sched.heap_count != 0 || q->running != 0 || q->note_count != 0) {
    q->drained_reported = false;
    return;
  }
  if (q->drained_reported || q->closing) return;
  q->drained_reported = true;
  if (q->opts.on_drain != NULL) q->opts.on_drain(q, q->opts.data);
}

/* Starts one attempt of the job in slot index; returns the time it read. */
static uint64_t start_run(keel_queue *q, uint32_t index) {
  keel__job_slot *slot = keel__slot(&q->sched, index);
  uint64_t now_ns = uv_hrtime();
  q->now_ns = now_ns;
  if (q->sync_end_pending) {
    keel__histogram_record(&q->run_hist, now_ns - q->sync_start_ns);
    q->sync_end_pending = false;
  }
  keel__histogram_record(&q->wait_hist, now_ns - slot->at.ready_ns);
  slot->state = KEEL__JOB_RUNNING;
  slot->attempts++;
  keel_job *run = run_take(q);
  if (run == NULL) {
    /* No memory for the attempt: it fails with UV_ENOMEM like any attempt
     * (retried with backoff while retries remain), so the queue never
     * stalls waiting for a completion that will not come. */
    keel__fail(q->last_error, UV_ENOMEM, "out of memory starting an attempt");
    attempt_failed(q, NULL, index, UV_ENOMEM);
    return now_ns;
  }
  if (q->adaptive != NULL) {
    keel_adaptive_try_acquire(q->adaptive); /* below_limit() said there is room */
    if (q->opts.clock.now != NULL) run->started_ms = qnow(q);
  }
  run->state = RUN_ACTIVE;
  run->slot = index;
  run->id = keel__job_id(index, slot->generation);
  run->payload = slot->payload;
  run->priority = slot->priority;
  run->attempt = slot->attempts;
  run->started_ns = now_ns;
  run->timeout_pos = KEEL__NIL;
  run->deadline_ns = 0;
  q->running++;
  uint64_t timeout_ms = timeout_of(q, index);
  if (timeout_ms != 0) {
    run->deadline_ms = qnow(q) + timeout_ms;
    run->deadline_ns = timeout_ms >= (UINT64_MAX - now_ns) / 1000000u
                           ? UINT64_MAX
                           : now_ns + timeout_ms * 1000000u;
    timeout_add(q, run);
  }
  q->current = run;
  q->process(q, run, run->payload, q->opts.data);
  q->current = NULL;
  return now_ns;
}

/* Starts jobs while slots are free, at most slice_jobs of them and for at
 * most slice_us: the rest waits for the next loop iteration so that timers
 * and I/O run in between. Synchronous completions inside process() only free
 * their slot; this loop starts the next job (a trampoline, no recursion). */
static void dispatch(keel_queue *q) {
  if (q->in_dispatch) return;
  q->in_dispatch = true;
  uint32_t budget = q->opts.slice_jobs;
  uint64_t end_ns = 0;
  bool first = true;
  while (!q->paused && !q->closing && below_limit(q) && budget > 0) {
    uint32_t index = keel__sched_pop(&q->sched);
    if (index == KEEL__NIL) break;
    budget--;
    uint64_t now_ns = start_run(q, index);
    if (first) {
      end_ns = now_ns + (uint64_t)q->opts.slice_us * 1000u;
      first = false;
    } else if (now_ns >= end_ns) {
      break;
    }
  }
  if (q->sync_end_pending) {
    keel__histogram_record(&q->run_hist, uv_hrtime() - q->sync_start_ns);
    q->sync_end_pending = false;
  }
  q->in_dispatch = false;
}

/* Calls on_error/release for jobs cancelled since the last iteration. */
static void deliver_notes(keel_queue *q) {
  /* Callbacks may cancel more jobs (appending notes): index, not pointer. */
  for (size_t i = 0; i < q->note_count; i++) {
    cancel_note note = q->notes[i];
    if (q->opts.on_error != NULL)
      q->opts.on_error(q, NULL, note.payload, UV_ECANCELED, note.attempts, true, q->opts.data);
    release_payload(q, note.payload, UV_ECANCELED);
  }
  q->note_count = 0;
}

static bool startable(const keel_queue *q) {
  return !q->paused && !q->closing && q->sched.pending != 0 && below_limit(q);
}

static bool condition_holds(const keel_queue *q, const when_wait *w) {
  switch (w->condition) {
    case KEEL_QUEUE_EMPTY:
      return q->sched.pending == 0;
    case KEEL_QUEUE_IDLE:
      return q->sched.pending == 0 && q->sched.heap_count == 0 && q->running == 0 &&
             q->note_count == 0;
    case KEEL_QUEUE_SIZE_BELOW:
      return q->sched.pending < w->n;
    case KEEL_QUEUE_NONE_RUNNING:
      return q->running == 0 && q->timed_out_outstanding == 0;
  }
  return false;
}

/* Calls the waits whose condition holds, in registration order. A callback
 * may add waits (appended, checked on a later pass) or close the queue. */
static void check_whens(keel_queue *q) {
  size_t i = 0;
  while (i < q->when_count && !q->closing) {
    if (!condition_holds(q, &q->whens[i])) {
      i++;
      continue;
    }
    when_wait w = q->whens[i];
    memmove(&q->whens[i], &q->whens[i + 1], (q->when_count - i - 1) * sizeof *q->whens);
    q->when_count--;
    w.cb(q, 0, w.data);
  }
}

static void check_empty(keel_queue *q) {
  if (q->sched.pending != 0) {
    q->empty_reported = false;
    return;
  }
  if (q->empty_reported || q->closing) return;
  q->empty_reported = true;
  if (q->opts.on_empty != NULL) q->opts.on_empty(q, q->opts.data);
}

static void on_idle(uv_idle_t *idle) {
  keel_queue *q = idle->data;
  if (q->note_count != 0 && !q->closing) deliver_notes(q);
  dispatch(q);
  if (!q->closing) check_empty(q);
  check_drain(q);
  if (q->when_count != 0) check_whens(q);
  publish_held(q);
  if (q->closing) return; /* close owns the handle now */
  if (!startable(q) && q->note_count == 0) uv_idle_stop(&q->idle);
}

static void kick(keel_queue *q) {
  if (q->closing || uv_is_active((uv_handle_t *)&q->idle)) return;
  uv_idle_start(&q->idle, on_idle);
}

/* ---- retries ------------------------------------------------------------ */

static void arm_retry_timer(keel_queue *q) {
  if (q->closing) return;
  uint32_t index = keel__sched_next_due(&q->sched);
  if (index == KEEL__NIL) {
    uv_timer_stop(&q->retry_timer);
    return;
  }
  uint64_t now = qnow(q);
  uint64_t due = keel__slot(&q->sched, index)->at.due_ms;
  uv_timer_start(&q->retry_timer, on_retry_timer, due > now ? due - now : 0, 0);
}

static void on_retry_timer(uv_timer_t *timer) {
  keel_queue *q = timer->data;
  uint64_t now = qnow(q);
  uint64_t now_ns = uv_hrtime();
  while (!q->closing) {
    uint32_t index = keel__sched_next_due(&q->sched);
    if (index == KEEL__NIL || keel__slot(&q->sched, index)->at.due_ms > now) break;
    keel__sched_unwait(&q->sched, index);
    keel__job_slot *slot = keel__slot(&q->sched, index);
    slot->at.ready_ns = now_ns;
    if (keel__sched_enqueue(&q->sched, index) != 0) {
      /* No memory for a new priority level: the job ends here rather than
       * wait forever. */
      keel__fail(q->last_error, UV_ENOMEM, "out of memory re-queueing a retry");
      if (q->opts.on_error != NULL)
        q->opts.on_error(q, NULL, slot->payload, UV_ENOMEM, slot->attempts, true, q->opts.data);
      q->stats.failed++;
      finish_job(q, index, UV_ENOMEM);
    }
  }
  arm_retry_timer(q);
  kick(q);
}

uint64_t keel_job_id(const keel_job *job) {
  return job == NULL ? 0 : job->id;
}

void *keel_job_payload(const keel_job *job) {
  return job == NULL ? NULL : job->payload;
}

int keel_job_priority(const keel_job *job) {
  return job == NULL ? 0 : job->priority;
}

unsigned keel_job_attempt(const keel_job *job) {
  return job == NULL ? 0 : job->attempt;
}

/* ---- creation and pushes ----------------------------------------------- */

static void on_async(uv_async_t *async);

static int queue_create(uv_loop_t *loop, keel_queue_process_fn process, const keel_queue_opts *opts,
                        keel_queue **out, const char **why) {
  const char *problem = NULL;
  const char *backoff_problem = NULL;
  if (loop == NULL || opts == NULL || out == NULL)
    problem = "loop, opts and out are required";
  else if (process == NULL)
    problem = "a process function is required";
  else if (opts->concurrency == 0)
    problem = "concurrency must be >= 1";
  else if (opts->max_retries >= UINT32_MAX)
    problem = "max_retries must be below 4294967295 (attempts are counted in 32 bits)";
  else if (keel_backoff_validate(&opts->retry_backoff, &backoff_problem) != 0)
    problem = backoff_problem;
  else if (opts->adaptive != NULL &&
           keel_adaptive_validate_opts(opts->adaptive, &backoff_problem) != 0)
    problem = backoff_problem;
  *why = problem;
  if (problem != NULL) return UV_EINVAL;

  keel_queue *q = keel__calloc(1, sizeof *q);
  if (q == NULL) return (*why = "out of memory", UV_ENOMEM);
  q->loop = loop;
  q->process = process;
  q->opts = *opts;
  memset(q->opts.reserved_, 0, sizeof q->opts.reserved_);
  if (q->opts.rate_interval_ms == 0) q->opts.rate_interval_ms = 1000;
  if (q->opts.slice_jobs == 0) q->opts.slice_jobs = KEEL_QUEUE_DEFAULT_SLICE_JOBS;
  if (q->opts.slice_us == 0) q->opts.slice_us = KEEL_QUEUE_DEFAULT_SLICE_US;
  keel__sched_init(&q->sched);
  keel_rng_seed(&q->rng, opts->seed != 0 ? opts->seed : uv_hrtime());
  atomic_init(&q->ts_inside, 0);
  atomic_init(&q->ts_held, 0);
  q->opts.adaptive = NULL; /* not kept: the limiter has its own copy */
  if (opts->adaptive != NULL) {
    int arc = keel_adaptive_new(opts->adaptive, &q->adaptive);
    if (arc != 0) {
      keel__free(q);
      return (*why = "out of memory", arc);
    }
  }
  if (uv_mutex_init(&q->ts_mutex) != 0) {
    keel_adaptive_free(q->adaptive);
    keel__free(q);
    return (*why = "cannot create a mutex", UV_ENOMEM);
  }
  int rc = uv_async_init(loop, &q->async, on_async);
  if (rc != 0) {
    uv_mutex_destroy(&q->ts_mutex);
    keel_adaptive_free(q->adaptive);
    keel__free(q);
    return (*why = "cannot create the uv_async_t for thread-safe pushes", rc);
  }
  uv_idle_init(loop, &q->idle);
  uv_timer_init(loop, &q->retry_timer);
  uv_timer_init(loop, &q->timeout_timer);
  q->async.data = q->idle.data = q->retry_timer.data = q->timeout_timer.data = q;
  q->handles_open = 4;
  /* An idle queue must not keep the loop running: only work that is due
   * (a dispatch, a retry, a timeout) holds a reference. */
  uv_unref((uv_handle_t *)&q->async);
  q->rate_mark_ms = uv_now(loop);
  q->stats.concurrency = opts->concurrency;
  q->drained_reported = true; /* an empty new queue has nothing to report */
  q->empty_reported = true;
  *out = q;
  return 0;
}

int keel_queue_new(uv_loop_t *loop, keel_queue_process_fn process, const keel_queue_opts *opts,
                   keel_queue **out) {
  const char *why;
  return queue_create(loop, process, opts, out, &why);
}

int keel_queue_new_ex(uv_loop_t *loop, keel_queue_process_fn process, const keel_queue_opts *opts,
                      keel_queue **out, char *why_buf, size_t why_cap) {
  const char *why = NULL;
  int rc = queue_create(loop, process, opts, out, &why);
  return keel__why(why_buf, why_cap, rc, rc == 0 ? "" : why);
}

static int push_slot(keel_queue *q, void *payload, int priority, keel__job_overrides *overrides,
                     uint64_t *id_out) {
  uint32_t index = keel__sched_alloc(&q->sched);
  if (index == KEEL__NIL) return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
  keel__job_slot *slot = keel__slot(&q->sched, index);
  slot->payload = payload;
  slot->priority = priority;
  if (overrides != NULL && keel__sched_set_overrides(&q->sched, index, overrides) != 0) {
    keel__sched_release(&q->sched, index);
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
  }
  slot->attempts = 0;
  /* Inside dispatch (a push from a callback), its last read is fresh. */
  slot->at.ready_ns = q->in_dispatch ? q->now_ns : uv_hrtime();
  if (keel__sched_enqueue(&q->sched, index) != 0) {
    keel__sched_set_overrides(&q->sched, index, NULL); /* the caller still owns it */
    keel__sched_release(&q->sched, index);
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
  }
  q->stats.pushed++;
  q->drained_reported = false;
  q->empty_reported = false;
  publish_held(q);
  if (id_out != NULL) *id_out = keel__job_id(index, slot->generation);
  kick(q);
  return 0;
}

static int check_push(keel_queue *q) {
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  if (q->opts.max_pending != 0 && held(q) >= q->opts.max_pending)
    return keel__fail(q->last_error, KEEL_EFULL,
                      "queue is full: %zu jobs pending, waiting for a retry or cancelled",
                      q->opts.max_pending);
  return 0;
}

int keel_queue_push(keel_queue *q, void *payload, int priority, uint64_t *id_out) {
  if (q == NULL) return UV_EINVAL;
  int rc = check_push(q);
  if (rc != 0) return rc;
  return push_slot(q, payload, priority, NULL, id_out);
}

int keel_queue_push_ex(keel_queue *q, void *payload, const keel_queue_push_opts *opts,
                       uint64_t *id_out) {
  if (q == NULL) return UV_EINVAL;
  if (opts == NULL) return keel__fail(q->last_error, UV_EINVAL, "push options are NULL");
  int rc = check_push(q);
  if (rc != 0) return rc;
  const char *why = NULL;
  if (opts->backoff != NULL && keel_backoff_validate(opts->backoff, &why) != 0)
    return keel__fail(q->last_error, UV_EINVAL, "bad backoff: %s", why);
  keel__job_overrides *ov = NULL;
  if (opts->backoff != NULL || opts->max_retries >= 0 || opts->timeout_ms != 0) {
    ov = keel__calloc(1, sizeof *ov);
    if (ov == NULL) return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
    ov->max_retries = opts->max_retries;
    ov->timeout_ms = opts->timeout_ms;
    if (opts->backoff != NULL) {
      ov->backoff = *opts->backoff;
      ov->has_backoff = true;
    }
  }
  rc = push_slot(q, payload, opts->priority, ov, id_out);
  if (rc != 0) keel__free(ov);
  return rc;
}

int keel_queue_push_threadsafe(keel_queue *q, void *payload, int priority) {
  if (q == NULL) return UV_EINVAL;
  /* Announce the caller first: close frees the queue only once no caller is
   * inside, and this counter is the last thing a caller touches. */
  atomic_fetch_add(&q->ts_inside, 1);
  int rc = 0;
  uv_mutex_lock(&q->ts_mutex);
  size_t held_now = atomic_load_explicit(&q->ts_held, memory_order_relaxed);
  if (q->ts_closed) {
    rc = KEEL_ECLOSING;
  } else if (q->opts.max_pending != 0 && held_now + q->ts_count >= q->opts.max_pending) {
    rc = KEEL_EFULL;
  } else {
    if (q->ts_count == q->ts_cap) {
      size_t cap = q->ts_cap ? q->ts_cap * 2 : 256;
      threadsafe_push *items = keel__realloc(q->ts_items, cap * sizeof *items);
      if (items == NULL) {
        rc = UV_ENOMEM;
      } else {
        q->ts_items = items;
        q->ts_cap = cap;
      }
    }
    if (rc == 0) {
      q->ts_items[q->ts_count].payload = payload;
      q->ts_items[q->ts_count].priority = priority;
      /* One wake-up per batch; sent under the lock, so close (which sets
       * ts_closed under it) never races with a send on a closing handle. */
      if (q->ts_count++ == 0) uv_async_send(&q->async);
    }
  }
  uv_mutex_unlock(&q->ts_mutex);
  atomic_fetch_sub(&q->ts_inside, 1);
  return rc;
}

/* Takes every thread-safe push collected so far. */
static void take_threadsafe_batch(keel_queue *q, threadsafe_push **items, size_t *count,
                                  size_t *cap) {
  uv_mutex_lock(&q->ts_mutex);
  *items = q->ts_items;
  *count = q->ts_count;
  *cap = q->ts_cap;
  q->ts_items = NULL;
  q->ts_count = q->ts_cap = 0;
  uv_mutex_unlock(&q->ts_mutex);
}

static void on_async(uv_async_t *async) {
  keel_queue *q = async->data;
  threadsafe_push *items;
  size_t count, cap;
  take_threadsafe_batch(q, &items, &count, &cap);
  for (size_t i = 0; i < count; i++) {
    /* A release callback may close the queue: the rest is dropped too. */
    int rc =
        q->closing ? UV_ECANCELED : push_slot(q, items[i].payload, items[i].priority, NULL, NULL);
    if (rc != 0) release_payload(q, items[i].payload, rc);
  }
  publish_held(q);
  /* Reuse the buffer for the next batch when none was started meanwhile. */
  uv_mutex_lock(&q->ts_mutex);
  if (q->ts_items == NULL && !q->ts_closed) {
    q->ts_items = items;
    q->ts_cap = cap;
    items = NULL;
  }
  uv_mutex_unlock(&q->ts_mutex);
  keel__free(items);
}

/* ---- control ----------------------------------------------------------- */

int keel_queue_cancel(keel_queue *q, uint64_t id) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  uint32_t index = keel__sched_lookup(&q->sched, id);
  if (index == KEEL__NIL) return KEEL_ENOTFOUND;
  keel__job_slot *slot = keel__slot(&q->sched, index);
  if (slot->state != KEEL__JOB_PENDING && slot->state != KEEL__JOB_WAITING) return KEEL_ENOTFOUND;
  /* Room for the note first: a cancel either happens whole or not at all. */
  if (q->note_count == q->note_cap) {
    size_t cap = q->note_cap ? q->note_cap * 2 : 16;
    cancel_note *notes = keel__realloc(q->notes, cap * sizeof *notes);
    if (notes == NULL) return keel__fail(q->last_error, UV_ENOMEM, "out of memory cancelling");
    q->notes = notes;
    q->note_cap = cap;
  }
  q->notes[q->note_count].payload = slot->payload;
  q->notes[q->note_count].attempts = slot->attempts;
  q->note_count++;
  if (slot->state == KEEL__JOB_PENDING) {
    keel__sched_cancel_pending(&q->sched, index);
  } else {
    bool was_first = keel__sched_next_due(&q->sched) == index;
    keel__sched_unwait(&q->sched, index);
    keel__sched_release(&q->sched, index);
    if (was_first) arm_retry_timer(q);
  }
  q->stats.cancelled++;
  publish_held(q);
  kick(q); /* on_error and release run on the next iteration */
  return 0;
}

/* Room for `more` cancel notes, all or nothing. */
static int reserve_notes(keel_queue *q, size_t more) {
  if (q->note_cap - q->note_count >= more) return 0;
  size_t cap = q->note_cap ? q->note_cap : 16;
  while (cap - q->note_count < more) {
    if (cap > SIZE_MAX / 2 / sizeof(cancel_note)) return UV_ENOMEM;
    cap *= 2;
  }
  cancel_note *notes = keel__realloc(q->notes, cap * sizeof *notes);
  if (notes == NULL) return UV_ENOMEM;
  q->notes = notes;
  q->note_cap = cap;
  return 0;
}

int keel_queue_clear(keel_queue *q, uint64_t *count_out) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  uint64_t total = q->sched.pending + q->sched.heap_count;
  if (total > SIZE_MAX || reserve_notes(q, (size_t)total) != 0)
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory clearing the queue");
  uint32_t index;
  while ((index = keel__sched_pop(&q->sched)) != KEEL__NIL) {
    keel__job_slot *slot = keel__slot(&q->sched, index);
    q->notes[q->note_count].payload = slot->payload;
    q->notes[q->note_count].attempts = slot->attempts;
    q->note_count++;
    keel__sched_release(&q->sched, index);
  }
  while ((index = keel__sched_next_due(&q->sched)) != KEEL__NIL) {
    keel__sched_unwait(&q->sched, index);
    keel__job_slot *slot = keel__slot(&q->sched, index);
    q->notes[q->note_count].payload = slot->payload;
    q->notes[q->note_count].attempts = slot->attempts;
    q->note_count++;
    keel__sched_release(&q->sched, index);
  }
  uv_timer_stop(&q->retry_timer);
  q->stats.cancelled += total;
  publish_held(q);
  if (count_out != NULL) *count_out = total;
  kick(q); /* on_error and release run on the next iteration */
  return 0;
}

int keel_queue_set_priority(keel_queue *q, uint64_t id, int priority) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  uint32_t index = keel__sched_lookup(&q->sched, id);
  if (index == KEEL__NIL) return KEEL_ENOTFOUND;
  keel__job_slot *slot = keel__slot(&q->sched, index);
  if (slot->state == KEEL__JOB_WAITING) {
    slot->priority = priority;
    return 0;
  }
  if (slot->state != KEEL__JOB_PENDING) return KEEL_ENOTFOUND;
  if (keel__sched_reprioritize(&q->sched, index, priority) != 0)
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory changing a priority");
  return 0;
}

uint64_t keel_queue_count_priority(const keel_queue *q, int priority) {
  return q == NULL ? 0 : keel__sched_count_priority(&q->sched, priority);
}

size_t keel_queue_priority_counts(const keel_queue *q, keel_queue_priority_count *out, size_t cap) {
  if (q == NULL) return 0;
  const keel__sched *s = &q->sched;
  for (size_t i = 0; i < cap && i < s->level_count; i++) {
    const keel__level *level = &s->levels[s->level_count - 1 - i]; /* highest first */
    out[i].priority = level->priority;
    out[i].pending = level->count - level->cancelled;
  }
  return s->level_count;
}

int keel_queue_when(keel_queue *q, keel_queue_condition condition, uint64_t n,
                    keel_queue_when_cb cb, void *data) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  if (cb == NULL) return keel__fail(q->last_error, UV_EINVAL, "a callback is required");
  if (condition != KEEL_QUEUE_EMPTY && condition != KEEL_QUEUE_IDLE &&
      condition != KEEL_QUEUE_SIZE_BELOW && condition != KEEL_QUEUE_NONE_RUNNING)
    return keel__fail(q->last_error, UV_EINVAL, "unknown condition %d", (int)condition);
  if (q->when_count >= KEEL_QUEUE_MAX_WHEN)
    return keel__fail(q->last_error, KEEL_EFULL, "%u waits already registered",
                      KEEL_QUEUE_MAX_WHEN);
  if (q->when_count == q->when_cap) {
    size_t cap = q->when_cap ? q->when_cap * 2 : 4;
    when_wait *whens = keel__realloc(q->whens, cap * sizeof *whens);
    if (whens == NULL) return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
    q->whens = whens;
    q->when_cap = cap;
  }
  q->whens[q->when_count++] = (when_wait){condition, n, cb, data};
  /* Checked from the idle handle: on a later iteration, never inside. */
  kick(q);
  return 0;
}

int keel_queue_pause_wait(keel_queue *q, keel_queue_when_cb cb, void *data) {
  int rc = keel_queue_when(q, KEEL_QUEUE_NONE_RUNNING, 0, cb, data);
  if (rc != 0) return rc;
  q->paused = true;
  return 0;
}

uint64_t keel_queue_retry_delay_ms(const keel_queue *q) {
  return q == NULL ? 0 : q->error_retry_delay_ms;
}

int keel_queue_tick(keel_queue *q) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  arm_retry_timer(q);
  arm_timeout_timer(q);
  return 0;
}

int keel_queue_pause(keel_queue *q) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  q->paused = true;
  return 0;
}

int keel_queue_resume(keel_queue *q) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  q->paused = false;
  kick(q);
  return 0;
}

int keel_queue_set_concurrency(keel_queue *q, unsigned concurrency) {
  if (q == NULL) return UV_EINVAL;
  if (q->closing) return keel__fail(q->last_error, KEEL_ECLOSING, "queue is closing");
  if (concurrency == 0) return keel__fail(q->last_error, UV_EINVAL, "concurrency must be >= 1");
  q->opts.concurrency = concurrency;
  kick(q);
  return 0;
}

static void latency_of(const keel__histogram *h, keel_queue_latency *out) {
  out->mean_us = h->count ? (double)h->sum_ns / (double)h->count / 1000.0 : 0.0;
  out->p50_us = keel__histogram_quantile(h, 0.50) / 1000.0;
  out->p99_us = keel__histogram_quantile(h, 0.99) / 1000.0;
  out->max_us = (double)h->max_ns / 1000.0;
}

void keel_queue_get_stats(const keel_queue *q, keel_queue_stats *out) {
  if (q == NULL || out == NULL) return;
  *out = q->stats;
  out->pending = q->sched.pending;
  out->waiting = q->sched.heap_count;
  out->running = q->running;
  out->paused = q->paused;
  out->concurrency = q->opts.concurrency;
  out->limit = q->opts.concurrency;
  if (q->adaptive != NULL && keel_adaptive_limit(q->adaptive) < out->limit)
    out->limit = keel_adaptive_limit(q->adaptive);
  latency_of(&q->wait_hist, &out->wait);
  latency_of(&q->run_hist, &out->run);
  memset(out->reserved_, 0, sizeof out->reserved_);
}

const char *keel_queue_last_error(const keel_queue *q) {
  return q == NULL ? "queue is NULL" : q->last_error;
}

/* ---- close --------------------------------------------------------------- */

/*
 * Close runs in three steps, none of them inside keel_queue_close():
 *  1. keel_queue_close() refuses new work (KEEL_ECLOSING, also for
 *     thread-safe pushes, under ts_mutex), stops the idle handle and closes
 *     the timers and the async handle.
 *  2. When those have closed (a later iteration), cancellations not yet
 *     reported are reported, and every job still queued (thread-safe
 *     batch, pending, waiting for a retry) is released with UV_ECANCELED.
 *  3. Once no attempt is outstanding, the idle handle is closed; its close
 *     callback calls the user's close callback, waits for thread-safe
 *     callers still inside the push, and frees the queue.
 */
static void free_queue(keel_queue *q) {
  if (q->close_cb != NULL) q->close_cb(q, q->close_data);
  /* Pushers that entered before the callback returned may still be inside
   * keel_queue_push_threadsafe() (they only see ts_closed and leave). */
  while (atomic_load(&q->ts_inside) != 0) uv_sleep(0);
  keel_job *run = q->free_runs;
  while (run != NULL) {
    keel_job *next = run->next_free;
    keel__free(run);
    run = next;
  }
  keel__sched_free(&q->sched);
  keel__free(q->timeouts);
  keel__free(q->notes);
  keel__free(q->whens);
  keel_adaptive_free(q->adaptive);
  keel__free(q->ts_items);
  uv_mutex_destroy(&q->ts_mutex);
  keel__free(q);
}

static void on_handle_closed(uv_handle_t *handle);

static void maybe_close_idle(keel_queue *q) {
  if (!q->drop_done || q->idle_closing || q->running != 0 || q->timed_out_outstanding != 0) return;
  q->idle_closing = true;
  uv_close((uv_handle_t *)&q->idle, on_handle_closed);
}

static void drop_queued(keel_queue *q) {
  q->drop_done = true;
  deliver_notes(q);
  /* Waits that never came true: UV_ECANCELED, before the close callback. A
   * callback cannot add waits any more (KEEL_ECLOSING). */
  for (size_t i = 0; i < q->when_count; i++) q->whens[i].cb(q, UV_ECANCELED, q->whens[i].data);
  q->when_count = 0;
  threadsafe_push *items;
  size_t count, cap;
  take_threadsafe_batch(q, &items, &count, &cap);
  for (size_t i = 0; i < count; i++) release_payload(q, items[i].payload, UV_ECANCELED);
  keel__free(items);
  uint32_t index;
  while ((index = keel__sched_pop(&q->sched)) != KEEL__NIL) {
    q->stats.cancelled++;
    finish_job(q, index, UV_ECANCELED);
  }
  while ((index = keel__sched_next_due(&q->sched)) != KEEL__NIL) {
    keel__sched_unwait(&q->sched, index);
    q->stats.cancelled++;
    finish_job(q, index, UV_ECANCELED);
  }
  maybe_close_idle(q);
}

static void on_handle_closed(uv_handle_t *handle) {
  keel_queue *q = handle->data;
  q->handles_open--;
  if (q->handles_open == 1 && !q->drop_done)
    drop_queued(q);
  else if (q->handles_open == 0)
    free_queue(q);
}

void keel_queue_close(keel_queue *q, keel_close_cb cb, void *data) {
  if (q == NULL || q->closing) return;
  keel__stats_hooks_detach(&q->stats_hooks);
  q->closing = true;
  q->close_cb = cb;
  q->close_data = data;
  uv_mutex_lock(&q->ts_mutex);
  q->ts_closed = true;
  uv_mutex_unlock(&q->ts_mutex);
  uv_idle_stop(&q->idle);
  uv_close((uv_handle_t *)&q->retry_timer, on_handle_closed);
  uv_close((uv_handle_t *)&q->timeout_timer, on_handle_closed);
  uv_close((uv_handle_t *)&q->async, on_handle_closed);
}

keel__stats_hooks *keel__queue_stats_hooks(keel_queue *q) {
  return q->closing ? NULL : &q->stats_hooks; /* no registration once closing */
}

const keel__histogram *keel__queue_histogram(const keel_queue *q, bool run) {
  return run ? &q->run_hist : &q->wait_hist;
}
