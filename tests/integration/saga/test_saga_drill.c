/* Sagas on the real PostgreSQL while their log's and queue's sessions are
 * terminated under them (the log writes pipelined, the default). Its own
 * executable: no child processes, and nothing else running in it. */
#include "common.h"

typedef struct terminator {
  world *w;
  uv_timer_t t;
  int rounds;
  long terminated;
} terminator;

static void terminate_tick(uv_timer_t *t) {
  terminator *k = t->data;
  /* every session of this saga object's log and queue that has run a
   * statement naming their tables (the participants' statements name
   * act()/undo(); other tests' sessions name other schemas) */
  char *v = kt_pg_scalarf(
      "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
      " WHERE pid <> pg_backend_pid() AND datname = current_database()"
      " AND (query LIKE '%%%s.saga_%%' OR query LIKE '%%%s.pgqueue_%%')",
      k->w->schema, k->w->schema);
  k->terminated += v ? strtol(v, NULL, 10) : 0;
  free(v);
  if (++k->rounds == 12) uv_timer_stop(t);
}

/* Log writes pipelined on two connections (the default) while those
 * sessions and the queue's are terminated a dozen times: in-flight log
 * writes fail together, in doubt or lost. Every saga must still end done,
 * each participant's effect applied exactly once. */
Test(saga_drill, log_sessions_terminated_mid_run, .timeout = 300) {
  const int n = 240;
  world w;
  world_init(&w, "saga_lt", n, 100);
  world_opts(&w);
  w.o.pool_size = 0; /* the default: pipelined log writes */
  w.o.lease_ms = 1000;
  w.o.poll_ms = 100;
  world_start_objects(&w);
  terminator k = {.w = &w};
  uv_timer_init(&w.loop, &k.t);
  k.t.data = &k;
  for (int i = 1; i <= n; i++) world_start(&w, i, 40, 0);
  /* the starts first (a start in flight when its session goes is in doubt,
   * which keel_saga_start's callback says): the drill is for the runs */
  while (w.started < n) uv_run(&w.loop, UV_RUN_ONCE);
  cr_assert_eq(w.start_status, 0, "%s", keel_err_name(w.start_status));
  cr_assert_lt(w.c.ended, n / 2, "most sagas still to run when the drill begins");
  uv_timer_start(&k.t, terminate_tick, 0, 60);
  uint64_t t0 = uv_now(&w.loop);
  while ((w.started < n || k.rounds < 12 || world_open_count(&w) > 0) &&
         uv_now(&w.loop) - t0 < 120000) {
    for (int i = 0; i < 20; i++) uv_run(&w.loop, UV_RUN_NOWAIT), usleep(2000);
    uv_update_time(&w.loop);
  }
  uv_close((uv_handle_t *)&k.t, NULL);
  fprintf(stderr, "log drill: terminated %ld sessions in %d rounds; %d ended here\n", k.terminated,
          k.rounds, w.c.ended);
  cr_assert(k.terminated > 0, "no session was terminated: the drill did nothing");
  cr_assert_eq(
      schema_count("SELECT count(*) FROM %s.saga_instances WHERE state <> 'done'", w.schema), 0,
      "every saga done");
  cr_assert_eq(schema_count("SELECT count(*) FROM %s.saga_instances", w.schema), n);
  cr_assert_eq(schema_count("SELECT count(*) FROM (SELECT key FROM %s.effects GROUP BY key"
                            " HAVING count(*) > 1) d",
                            w.schema),
               0, "an effect applied twice");
  cr_assert_eq(schema_count("SELECT count(*) FROM %s.effects", w.schema), 3 * n);
  cr_assert_eq(schema_count("SELECT count(*) FROM %s.items WHERE booked <> 1", w.schema), 0);
  cr_assert_eq(schema_count("SELECT count(*) FROM %s.wallets WHERE balance <> 60", w.schema), 0);
  cr_assert_eq(schema_count("SELECT count(*) FROM %s.pgqueue_jobs", w.schema), 0,
               "a saga job left");
  world_finish(&w);
}
