/* Allocation failure is an input: new, a start, a re-drive and a resume,
 * then close, with the i-th allocation failing for every i. No crash, no
 * leak, every accepted operation's callback exactly once, the loop closes. */
#include "common.h"

typedef struct fm {
  int start_cb, redrive_cb, resume_cb;
  bool closed;
} fm;

static void fm_started(keel_saga *s, int status, int64_t id, bool existed, void *data) {
  (void)s, (void)status, (void)id, (void)existed;
  ((fm *)data)->start_cb++;
}
static void fm_id(keel_saga *s, int status, int64_t id, void *data) {
  (void)s, (void)status, (void)id;
  ((fm *)data)->redrive_cb++;
}
static void fm_resumed(keel_saga *s, int status, int64_t id, void *data) {
  (void)s, (void)status, (void)id;
  ((fm *)data)->resume_cb++;
}
static void fm_closed(void *obj, void *data) {
  (void)obj;
  ((fm *)data)->closed = true;
}

static void scenario(void *arg) {
  const char *schema = arg;
  uv_loop_t loop;
  cr_assert_eq(uv_loop_init(&loop), 0);
  keel_saga_step st[2];
  keel_saga_step_init(&st[0], "a", s_book, s_release);
  keel_saga_step_init(&st[1], "b", s_reserve, NULL);
  st[1].kind = KEEL_SAGA_RETRIABLE;
  keel_saga_opts o;
  keel_saga_opts_init(&o);
  o.conninfo = kt_pg_conninfo();
  o.schema = schema;
  o.type = "fm";
  o.steps = st;
  o.nsteps = 2;
  o.pool_size = 1;
  fm f = {0};
  keel_saga *s = NULL;
  char why[200];
  int rc = keel_saga_new_ex(&loop, &o, &s, why, sizeof why);
  if (rc != 0) {
    cr_assert_eq(rc, UV_ENOMEM, "new: %d", rc);
    /* an allocation that failed is said as such, never as a bad conninfo */
    cr_assert(strstr(why, "out of memory") != NULL && strstr(why, "conninfo") == NULL, "why: %s",
              why);
    kt_loop_finish(&loop);
    return;
  }
  int accepted_start = keel_saga_start(s, NULL, fm_started, &f) == 0;
  int accepted_redrive = keel_saga_redrive(s, 42, fm_id, &f) == 0;
  int accepted_resume = keel_saga_resume(s, 42, fm_resumed, &f) == 0;
  uv_run(&loop, UV_RUN_NOWAIT);
  cr_assert_eq(f.start_cb + f.redrive_cb + f.resume_cb, 0, "nothing runs inside the calls");
  keel_saga_close(s, fm_closed, &f);
  kt_loop_finish(&loop);
  cr_assert(f.closed);
  cr_assert_eq(f.start_cb, accepted_start);
  cr_assert_eq(f.redrive_cb, accepted_redrive);
  cr_assert_eq(f.resume_cb, accepted_resume);
}

Test(saga_failmalloc, new_start_close, .timeout = 900) {
  char schema[64];
  kt_unique_name(schema, sizeof schema, "saga_fm");
  kt_failmalloc_run(scenario, schema);
}
