/* The job queue's libuv adapter: dispatch (a trampoline, so synchronous
 * completions never recurse), attempts and their timeouts, retries on one
 * timer, the thread-safe push, statistics and close. The ordering and the
 * bookkeeping of jobs live in sched.c. */
#include <stdio.h>

#include "core/alloc.h"
#include "core/histogram.h"
#include "core/util.h"
#include "keel/queue.h"
#include "queue/sched.h"

typedef enum run_state { RUN_FREE = 0, RUN_ACTIVE, RUN_TIMED_OUT } run_state;

/* One attempt. Its address is the keel_job handle users hold; it is never
 * reused while the user may still call keel_job_done() on it. */
struct keel_job {
  keel_queue *queue;
  keel_job *next_free;
  void *payload;
  uint64_t id;
  uint64_t started_ns;
  uint64_t deadline_ms;
  uint32_t slot;
  uint32_t timeout_pos; /* index in the timeout heap, KEEL__NIL when none */
  int priority;
  unsigned attempt;
  uint8_t state;
};

typedef struct threadsafe_push {
  void *payload;
  int priority;
} threadsafe_push;

struct keel_queue {
  uv_loop_t *loop;
  keel_queue_process_fn process;
  keel_queue_opts opts;
  keel__sched sched;
  keel_rng rng;
  unsigned running;
  unsigned timed_out_outstanding; /* attempts that timed out, done not yet called */
  bool paused;
  bool in_dispatch;
  bool closing;
  bool drained_reported;

  uv_timer_t kick_timer;    /* runs dispatch on the next loop iteration */
  uv_timer_t retry_timer;   /* fires when the earliest retry is due */
  uv_timer_t timeout_timer; /* fires when the earliest attempt deadline passes */
  uv_async_t async;         /* thread-safe pushes */
  unsigned handles_open;

  keel_job *free_runs;
  keel_job **timeouts; /* min-heap by deadline_ms */
  uint32_t timeout_count, timeout_cap;

  uv_mutex_t ts_mutex;
  threadsafe_push *ts_items;
  size_t ts_count, ts_cap;
  bool ts_closed;

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

void keel_queue_opts_init(keel_queue_opts *opts) {
  if (opts == NULL) return;
  memset(opts, 0, sizeof *opts);
  opts->concurrency = 1;
  opts->max_retries = 3;
  keel_backoff_fixed(&opts->retry_backoff, 1000);
  opts->rate_interval_ms = 1000;
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
  uint64_t now = uv_now(q->loop);
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
  run = keel__calloc(1, sizeof *run);
  if (run != NULL) run->queue = q;
  return run;
}

static void run_put(keel_queue *q, keel_job *run) {
  run->state = RUN_FREE;
  run->next_free = q->free_runs;
  q->free_runs = run;
}

static void maybe_free_queue(keel_queue *q);

static void release_payload(keel_queue *q, void *payload, int status) {
  if (q->opts.release != NULL) q->opts.release(q, payload, status, q->opts.data);
}

static const keel__job_overrides *overrides_of(keel_queue *q, uint32_t slot) {
  return keel__slot(&q->sched, slot)->overrides;
}

static uint64_t timeout_of(keel_queue *q, uint32_t slot) {
  const keel__job_overrides *ov = overrides_of(q, slot);
  if (ov != NULL && ov->timeout_ms != 0) return ov->timeout_ms == UINT64_MAX ? 0 : ov->timeout_ms;
  return q->opts.timeout_ms;
}

static void check_drain(keel_queue *q) {
  if (q->sched.pending != 0 || q->sched.heap_count != 0 || q->running != 0) {
    q->drained_reported = false;
    return;
  }
  if (q->drained_reported || q->closing) return;
  q->drained_reported = true;
  if (q->opts.on_drain != NULL) q->opts.on_drain(q, q->opts.data);
}

static int start_run(keel_queue *q, uint32_t index) {
  keel_job *run = run_take(q);
  if (run == NULL) {
    /* Not enough memory to start it now: back into its level (the level array
     * keeps its capacity, so this cannot fail) and try again on the next
     * push or completion. */
    keel__sched_enqueue(&q->sched, index);
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory starting a job; will retry");
  }
  keel__job_slot *slot = keel__slot(&q->sched, index);
  uint64_t now_ns = uv_hrtime();
  keel__histogram_record(&q->wait_hist, now_ns - slot->at.ready_ns);
  slot->state = KEEL__JOB_RUNNING;
  slot->attempts++;
  run->state = RUN_ACTIVE;
  run->slot = index;
  run->id = keel__job_id(index, slot->generation);
  run->payload = slot->payload;
  run->priority = slot->priority;
  run->attempt = slot->attempts;
  run->started_ns = now_ns;
  run->timeout_pos = KEEL__NIL;
  q->running++;
  uint64_t timeout_ms = timeout_of(q, index);
  if (timeout_ms != 0) {
    run->deadline_ms = uv_now(q->loop) + timeout_ms;
    if (timeout_add(q, run) != 0)
      keel__fail(q->last_error, UV_ENOMEM, "out of memory arming a job timeout; runs without");
  }
  q->process(q, run, run->payload, q->opts.data);
  return 0;
}

static void dispatch(keel_queue *q) {
  if (q->in_dispatch) return;
  q->in_dispatch = true;
  /* The trampoline: jobs completed inside process() just free their slot and
   * this loop starts the next one; nothing recurses. */
  while (!q->paused && !q->closing && q->running < q->opts.concurrency) {
    uint32_t index = keel__sched_pop(&q->sched);
    if (index == KEEL__NIL) break;
    if (start_run(q, index) != 0) break;
  }
  q->in_dispatch = false;
  check_drain(q);
}

static void on_kick(uv_timer_t *timer) {
  dispatch(timer->data);
}

static void kick(keel_queue *q) {
  if (q->in_dispatch || q->closing || uv_is_active((uv_handle_t *)&q->kick_timer)) return;
  uv_timer_start(&q->kick_timer, on_kick, 0, 0);
}

/* ---- retries ------------------------------------------------------------ */

static void on_retry_timer(uv_timer_t *timer);

static void arm_retry_timer(keel_queue *q) {
  uint32_t index = keel__sched_next_due(&q->sched);
  if (index == KEEL__NIL) {
    uv_timer_stop(&q->retry_timer);
    return;
  }
  uint64_t now = uv_now(q->loop);
  uint64_t due = keel__slot(&q->sched, index)->at.due_ms;
  uv_timer_start(&q->retry_timer, on_retry_timer, due > now ? due - now : 0, 0);
}

static void on_retry_timer(uv_timer_t *timer) {
  keel_queue *q = timer->data;
  uint64_t now = uv_now(q->loop);
  uint64_t now_ns = uv_hrtime();
  for (;;) {
    uint32_t index = keel__sched_next_due(&q->sched);
    if (index == KEEL__NIL || keel__slot(&q->sched, index)->at.due_ms > now) break;
    keel__sched_unwait(&q->sched, index);
    keel__slot(&q->sched, index)->at.ready_ns = now_ns;
    keel__sched_enqueue(&q->sched, index);
  }
  arm_retry_timer(q);
  dispatch(q);
}

/* ---- outcome of an attempt ----------------------------------------------- */

static void finish_job(keel_queue *q, uint32_t index, int status) {
  keel__job_slot *slot = keel__slot(&q->sched, index);
  void *payload = slot->payload;
  keel__sched_release(&q->sched, index);
  release_payload(q, payload, status);
}

/* Decides what happens to a job after a failed attempt. */
static void attempt_failed(keel_queue *q, keel_job *run, int status) {
  uint32_t index = run->slot;
  keel__job_slot *slot = keel__slot(&q->sched, index);
  const keel__job_overrides *ov = slot->overrides;
  unsigned max_retries =
      ov != NULL && ov->max_retries >= 0 ? (unsigned)ov->max_retries : q->opts.max_retries;
  keel_queue_classify_fn classify = q->opts.classify ? q->opts.classify : default_classify;
  bool retry = !q->closing && slot->attempts <= max_retries && classify(status, q->opts.data);
  if (q->opts.on_error != NULL)
    q->opts.on_error(q, run, slot->payload, status, slot->attempts, !retry, q->opts.data);
  if (!retry) {
    q->stats.failed++;
    finish_job(q, index, status);
    return;
  }
  const keel_backoff *backoff =
      ov != NULL && ov->has_backoff ? &ov->backoff : &q->opts.retry_backoff;
  uint64_t delay = keel_backoff_delay(backoff, slot->attempts, slot->last_delay_ms, &q->rng);
  slot->last_delay_ms = delay > UINT32_MAX ? UINT32_MAX : (uint32_t)delay;
  q->stats.retried++;
  if (keel__sched_wait(&q->sched, index, uv_now(q->loop) + delay) != 0) {
    /* No room in the retry heap: retry now rather than lose the job. */
    keel__slot(&q->sched, index)->at.ready_ns = uv_hrtime();
    keel__sched_enqueue(&q->sched, index);
    keel__fail(q->last_error, UV_ENOMEM, "out of memory scheduling a retry; retrying at once");
    return;
  }
  if (keel__sched_next_due(&q->sched) == index) arm_retry_timer(q);
}

static void attempt_ended(keel_queue *q, keel_job *run, int status) {
  q->running--;
  if (status == 0) {
    q->stats.completed++;
    uint64_t now_ms = uv_now(q->loop);
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
    attempt_failed(q, run, status);
  }
}

int keel_job_done(keel_job *run, int status) {
  if (run == NULL) return UV_EINVAL;
  keel_queue *q = run->queue;
  if (run->state == RUN_TIMED_OUT) {
    q->timed_out_outstanding--;
    run_put(q, run);
    if (q->closing) maybe_free_queue(q);
    return KEEL_ESTALE;
  }
  if (run->state != RUN_ACTIVE) return UV_EINVAL;
  if (status > 0) status = 0;
  keel__histogram_record(&q->run_hist, uv_hrtime() - run->started_ns);
  timeout_remove(q, run);
  attempt_ended(q, run, status);
  run_put(q, run);
  if (q->closing) {
    maybe_free_queue(q);
  } else if (!q->in_dispatch) {
    kick(q);
  }
  return 0;
}

static void on_timeout_timer(uv_timer_t *timer) {
  keel_queue *q = timer->data;
  uint64_t now = uv_now(q->loop);
  while (q->timeout_count > 0 && q->timeouts[0]->deadline_ms <= now) {
    keel_job *run = q->timeouts[0];
    timeout_remove(q, run);
    run->state = RUN_TIMED_OUT; /* the late keel_job_done() frees it */
    q->timed_out_outstanding++;
    q->stats.timed_out++;
    keel__histogram_record(&q->run_hist, uv_hrtime() - run->started_ns);
    attempt_ended(q, run, UV_ETIMEDOUT);
  }
  arm_timeout_timer(q);
  dispatch(q);
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
  else if (keel_backoff_validate(&opts->retry_backoff, &backoff_problem) != 0)
    problem = backoff_problem;
  *why = problem;
  if (problem != NULL) return UV_EINVAL;

  keel_queue *q = keel__calloc(1, sizeof *q);
  if (q == NULL) return (*why = "out of memory", UV_ENOMEM);
  q->loop = loop;
  q->process = process;
  q->opts = *opts;
  if (q->opts.rate_interval_ms == 0) q->opts.rate_interval_ms = 1000;
  keel__sched_init(&q->sched);
  keel_rng_seed(&q->rng, opts->seed != 0 ? opts->seed : uv_hrtime());
  if (uv_mutex_init(&q->ts_mutex) != 0) {
    keel__free(q);
    return (*why = "cannot create a mutex", UV_ENOMEM);
  }
  int rc = uv_async_init(loop, &q->async, on_async);
  if (rc != 0) {
    uv_mutex_destroy(&q->ts_mutex);
    keel__free(q);
    return (*why = "cannot create the uv_async_t for thread-safe pushes", rc);
  }
  uv_timer_init(loop, &q->kick_timer);
  uv_timer_init(loop, &q->retry_timer);
  uv_timer_init(loop, &q->timeout_timer);
  q->async.data = q->kick_timer.data = q->retry_timer.data = q->timeout_timer.data = q;
  q->handles_open = 4;
  /* An idle queue must not keep the loop running: only work that is due
   * (a kick, a retry, a timeout) holds a reference. */
  uv_unref((uv_handle_t *)&q->async);
  q->rate_mark_ms = uv_now(loop);
  q->stats.concurrency = opts->concurrency;
  q->drained_reported = true; /* an empty new queue has nothing to report */
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
  slot->overrides = overrides;
  slot->attempts = 0;
  slot->at.ready_ns = uv_hrtime();
  if (keel__sched_enqueue(&q->sched, index) != 0) {
    slot->overrides = NULL; /* the caller still owns it */
    keel__sched_release(&q->sched, index);
    return keel__fail(q->last_error, UV_ENOMEM, "out of memory");
  }
  q->stats.pushed++;
  q->drained_reported = false;
  if (id_out != NULL) *id_out = keel__job_id(index, slot->generation);
  kick(q);
  return 0;
}

static int check_push(keel_queue *q) {
  if (q->closing) return keel__fail(q->last_error, UV_ECANCELED, "queue is closing");
  if (q->opts.max_pending != 0 && q->sched.pending >= q->opts.max_pending)
    return keel__fail(q->last_error, KEEL_EFULL, "queue is full: %zu jobs pending",
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
  const char *why = NULL;
  if (opts->backoff != NULL && keel_backoff_validate(opts->backoff, &why) != 0)
    return keel__fail(q->last_error, UV_EINVAL, "bad backoff: %s", why);
  int rc = check_push(q);
  if (rc != 0) return rc;
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
  uv_mutex_lock(&q->ts_mutex);
  if (q->ts_closed) {
    uv_mutex_unlock(&q->ts_mutex);
    return UV_ECANCELED;
  }
  if (q->ts_count == q->ts_cap) {
    size_t cap = q->ts_cap ? q->ts_cap * 2 : 256;
    threadsafe_push *items = keel__realloc(q->ts_items, cap * sizeof *items);
    if (items == NULL) {
      uv_mutex_unlock(&q->ts_mutex);
      return UV_ENOMEM;
    }
    q->ts_items = items;
    q->ts_cap = cap;
  }
  q->ts_items[q->ts_count].payload = payload;
  q->ts_items[q->ts_count].priority = priority;
  bool first = q->ts_count++ == 0;
  uv_mutex_unlock(&q->ts_mutex);
  /* One wake-up per batch: later pushes find the loop already woken. */
  if (first) uv_async_send(&q->async);
  return 0;
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
    int rc =
        q->closing ? UV_ECANCELED : push_slot(q, items[i].payload, items[i].priority, NULL, NULL);
    if (rc != 0) release_payload(q, items[i].payload, rc == UV_ENOMEM ? UV_ENOMEM : UV_ECANCELED);
  }
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
  uint32_t index = keel__sched_lookup(&q->sched, id);
  if (index == KEEL__NIL) return KEEL_ENOTFOUND;
  keel__job_slot *slot = keel__slot(&q->sched, index);
  void *payload = slot->payload;
  unsigned attempts = slot->attempts;
  if (slot->state == KEEL__JOB_PENDING) {
    keel__sched_cancel_pending(&q->sched, index);
  } else if (slot->state == KEEL__JOB_WAITING) {
    bool was_first = keel__sched_next_due(&q->sched) == index;
    keel__sched_unwait(&q->sched, index);
    keel__sched_release(&q->sched, index);
    if (was_first) arm_retry_timer(q);
  } else {
    return KEEL_ENOTFOUND;
  }
  q->stats.cancelled++;
  if (q->opts.on_error != NULL)
    q->opts.on_error(q, NULL, payload, UV_ECANCELED, attempts, true, q->opts.data);
  release_payload(q, payload, UV_ECANCELED);
  if (!q->in_dispatch) check_drain(q);
  return 0;
}

int keel_queue_pause(keel_queue *q) {
  if (q == NULL) return UV_EINVAL;
  q->paused = true;
  return 0;
}

int keel_queue_resume(keel_queue *q) {
  if (q == NULL) return UV_EINVAL;
  q->paused = false;
  kick(q);
  return 0;
}

int keel_queue_set_concurrency(keel_queue *q, unsigned concurrency) {
  if (q == NULL) return UV_EINVAL;
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
  latency_of(&q->wait_hist, &out->wait);
  latency_of(&q->run_hist, &out->run);
}

const char *keel_queue_last_error(const keel_queue *q) {
  return q == NULL ? "queue is NULL" : q->last_error;
}

/* ---- close --------------------------------------------------------------- */

static void maybe_free_queue(keel_queue *q) {
  if (!q->closing || q->handles_open != 0 || q->running != 0 || q->timed_out_outstanding != 0)
    return;
  keel_close_cb cb = q->close_cb;
  void *data = q->close_data;
  keel_job *run = q->free_runs;
  while (run != NULL) {
    keel_job *next = run->next_free;
    keel__free(run);
    run = next;
  }
  keel__sched_free(&q->sched);
  keel__free(q->timeouts);
  keel__free(q->ts_items);
  uv_mutex_destroy(&q->ts_mutex);
  keel__free(q);
  if (cb != NULL) cb(q, data);
}

static void on_handle_closed(uv_handle_t *handle) {
  keel_queue *q = handle->data;
  if (--q->handles_open == 0) {
    /* A pusher that saw ts_closed == false may still be inside
     * keel_queue_push_threadsafe(): taking the lock waits it out. */
    uv_mutex_lock(&q->ts_mutex);
    uv_mutex_unlock(&q->ts_mutex);
  }
  maybe_free_queue(q);
}

void keel_queue_close(keel_queue *q, keel_close_cb cb, void *data) {
  if (q == NULL || q->closing) return;
  q->closing = true;
  q->close_cb = cb;
  q->close_data = data;

  uv_mutex_lock(&q->ts_mutex);
  q->ts_closed = true;
  uv_mutex_unlock(&q->ts_mutex);
  /* Thread-safe pushes accepted before the flag: released, never lost. */
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
  uv_close((uv_handle_t *)&q->kick_timer, on_handle_closed);
  uv_close((uv_handle_t *)&q->retry_timer, on_handle_closed);
  uv_close((uv_handle_t *)&q->timeout_timer, on_handle_closed);
  uv_close((uv_handle_t *)&q->async, on_handle_closed);
}
