/* Idempotency keys in PostgreSQL against the real server: the shared
 * scenarios (100 concurrent begins, mismatch, abort, large bodies, TTL, a
 * killed owner), and the keys inside the caller's own transaction (effect
 * and key commit together; rollback and a killed process free the key). */
#include "scenarios.h"

static void on_installed(keel_idem *idem, int status, void *data) {
  (void)idem;
  fx *f = data;
  f->done++;
  if (status != 0) {
    f->errors++;
    f->last_error = status;
  }
}

static void store_open(fx *f) {
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = kt_pg_conninfo();
  po.size = 4;
  keel_pg_pool *pool;
  cr_assert_eq(keel_pg_pool_new(&f->loop, &po, &pool), 0);
  f->client = pool;
  f->opts.table = f->scope; /* a table per test */
  cr_assert_eq(keel_idem_new_pg(&f->loop, pool, &f->opts, &f->idem), 0);
  f->errors = 0;
  cr_assert_eq(keel_idem_install(f->idem, on_installed, f), 0);
  wait_n(f, 1);
  cr_assert_eq(f->errors, 0, "install: %s", keel_idem_last_error(f->idem));
}

static void store_close(fx *f) {
  keel_idem_close(f->idem, NULL, NULL);
  keel_pg_pool_close(f->client, NULL, NULL);
  f->idem = NULL;
}

static void drop(fx *f) {
  kt_pg_execf("DROP TABLE IF EXISTS %s", f->scope);
  kt_pg_execf("DROP TABLE IF EXISTS %s_effect", f->scope);
}

Test(idem_pg, concurrent_begins_one_owner_then_stored_response) {
  fx f;
  fx_init(&f);
  store_open(&f);
  scenario_concurrent(&f);
  fx_finish(&f);
  drop(&f);
}

Test(idem_pg, abort_large_body_and_bad_input) {
  fx f;
  fx_init(&f);
  f.opts.max_body = 100;
  store_open(&f);
  scenario_abort_and_large(&f);
  fx_finish(&f);
  drop(&f);
}

Test(idem_pg, complete_after_processing_ttl_is_lost) {
  fx f;
  fx_init(&f);
  f.opts.processing_ttl_ms = 300;
  store_open(&f);
  scenario_ttl(&f);
  keel_idem_stats st;
  keel_idem_get_stats(f.idem, &st);
  cr_assert_eq(st.taken_over, 1, "the expired row was taken over");
  fx_finish(&f);
  drop(&f);
}

Test(idem_pg, owner_killed_busy_until_ttl_then_one_reexecution, .timeout = 120) {
  fx f;
  fx_init(&f);
  store_open(&f); /* creates the table before the child uses it */
  store_close(&f);
  scenario_owner_killed(&f, 2000);
  cr_assert(f.taken_over);
  fx_finish(&f);
  drop(&f);
}

/* ---- inside the caller's transaction ----------------------------------- */

typedef struct txc {
  fx *f;
  keel_pg_tx *tx;
  keel_pg *conn;
  const char *key;
  int begin_status;
  bool owner, completed, hold;
  int step;
  int tx_status;
  bool tx_done;
  bool rollback;
} txc;

static void tx_step(txc *c, int status);

static void tx_on_begin(keel_idem *idem, int status, const keel_idem_reply *r, void *data) {
  (void)idem;
  txc *c = data;
  c->begin_status = status;
  c->owner = status == 0 && !r->completed;
  c->completed = status == 0 && r->completed;
  if (c->owner) c->f->token = r->token;
  tx_step(c, 0);
}

static void tx_on_effect(keel_pg *conn, int status, const keel_pg_result *res, void *data) {
  (void)conn;
  (void)res;
  tx_step(data, status);
}

static void tx_on_complete(keel_idem *idem, int status, void *data) {
  (void)idem;
  tx_step(data, status);
}

static void tx_step(txc *c, int status) {
  fx *f = c->f;
  if (status != 0) {
    keel_pg_tx_finish(c->tx, status);
    return;
  }
  switch (c->step++) {
    case 0:
      cr_assert_eq(keel_idem_begin_tx(f->idem, c->conn, f->scope, c->key, "fp", tx_on_begin, c), 0);
      return;
    case 1: {
      if (!c->owner) {
        keel_pg_tx_finish(c->tx, -1);
        return;
      }
      char sql[256];
      snprintf(sql, sizeof sql, "INSERT INTO %s_effect VALUES (1)", f->scope);
      cr_assert_eq(keel_pg_query(c->conn, sql, 0, NULL, tx_on_effect, c), 0);
      return;
    }
    case 2:
      cr_assert_eq(keel_idem_complete_tx(f->idem, c->conn, f->scope, c->key, &f->token, 201, "ok",
                                         2, tx_on_complete, c),
                   0);
      return;
    case 3:
      if (c->hold) return; /* the test finishes it */
      keel_pg_tx_finish(c->tx, c->rollback ? -2 : 0);
      return;
  }
}

static void tx_body(keel_pg_tx *tx, keel_pg *conn, void *data) {
  txc *c = data;
  c->tx = tx;
  c->conn = conn;
  tx_step(c, 0);
}

static void tx_done(keel_pg_pool *pool, int status, const char *sqlstate, void *data) {
  (void)pool;
  (void)sqlstate;
  txc *c = data;
  c->tx_done = true;
  c->tx_status = status;
}

static bool tx_held(void *ctx) {
  txc *c = ctx;
  return c->step == 4 || c->tx_done;
}

static bool tx_finished(void *ctx) {
  return ((txc *)ctx)->tx_done;
}

static long effects(fx *f) {
  char *v = kt_pg_scalarf("SELECT count(*) FROM %s_effect", f->scope);
  long n = strtol(v, NULL, 10);
  free(v);
  return n;
}

Test(idem_pg, in_transaction_key_and_effect_commit_together) {
  fx f;
  fx_init(&f);
  store_open(&f);
  kt_pg_execf("CREATE TABLE %s_effect (x int)", f.scope);
  txc c = {.f = &f, .key = "tx1", .hold = true};
  cr_assert_eq(keel_pg_pool_transaction(f.client, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &c), 0);
  cr_assert(kt_wait_for(&f.loop, tx_held, &c, 10000));
  cr_assert_eq(c.step, 4, "owner, effect and complete_tx done (begin %s)",
               keel_err_name(c.begin_status));
  /* Not committed: a concurrent begin is busy at once, without waiting. */
  begins(&f, 3, "tx1", "fp");
  cr_assert_eq(f.busy, 3);
  begins(&f, 1, "tx1", "other");
  cr_assert_eq(f.busy, 1, "the uncommitted row is invisible: busy, not mismatch");
  keel_pg_tx_finish(c.tx, 0);
  cr_assert(kt_wait_for(&f.loop, tx_finished, &c, 10000));
  cr_assert_eq(c.tx_status, 0);
  begins(&f, 5, "tx1", "fp");
  cr_assert_eq(f.replays, 5);
  cr_assert_eq(f.status, 201);
  cr_assert_eq(f.body_len, 2);
  cr_assert_eq(effects(&f), 1);

  /* Rolled back: neither effect nor key; the key is free at once. */
  txc r = {.f = &f, .key = "tx2", .rollback = true};
  cr_assert_eq(keel_pg_pool_transaction(f.client, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &r), 0);
  cr_assert(kt_wait_for(&f.loop, tx_finished, &r, 10000));
  cr_assert(r.owner);
  cr_assert_eq(r.tx_status, -2);
  cr_assert_eq(effects(&f), 1);
  begins(&f, 1, "tx2", "fp");
  cr_assert_eq(f.owners, 1, "free after the rollback");
  fx_finish(&f);
  drop(&f);
}

Test(idem_pg, in_transaction_100_concurrent_one_effect) {
  fx f;
  fx_init(&f);
  store_open(&f);
  kt_pg_execf("CREATE TABLE %s_effect (x int)", f.scope);
  static txc c[100];
  for (int i = 0; i < 100; i++) {
    c[i] = (txc){.f = &f, .key = "many"};
    cr_assert_eq(
        keel_pg_pool_transaction(f.client, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &c[i]), 0);
  }
  int owners = 0, busy = 0, replays = 0, committed = 0;
  for (int i = 0; i < 100; i++) {
    cr_assert(kt_wait_for(&f.loop, tx_finished, &c[i], 30000));
    owners += c[i].owner;
    busy += c[i].begin_status == KEEL_EINPROGRESS;
    replays += c[i].completed;
    committed += c[i].tx_status == 0;
  }
  cr_assert_eq(owners, 1);
  cr_assert_eq(committed, 1);
  cr_assert_eq(owners + busy + replays, 100, "owners %d busy %d replays %d", owners, busy, replays);
  cr_assert_eq(effects(&f), 1);
  fx_finish(&f);
  drop(&f);
}

/* The process that holds the key in an open transaction is killed: its
 * backend rolls back, and the key is free again (no TTL to wait for). */
Test(idem_pg, in_transaction_owner_killed_frees_the_key, .timeout = 120) {
  fx f;
  fx_init(&f);
  f.opts.processing_ttl_ms = 600000; /* the TTL plays no part */
  store_open(&f);
  kt_pg_execf("CREATE TABLE %s_effect (x int)", f.scope);
  store_close(&f);
  int fds[2];
  cr_assert_eq(pipe(fds), 0);
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    close(fds[0]);
    fx ch;
    fx_init(&ch);
    memcpy(ch.scope, f.scope, sizeof ch.scope);
    ch.opts = f.opts;
    store_open(&ch);
    txc c = {.f = &ch, .key = "killed", .hold = true};
    keel_pg_pool_transaction(ch.client, KEEL_PG_READ_COMMITTED, tx_body, tx_done, &c);
    while (!tx_held(&c)) uv_run(&ch.loop, UV_RUN_ONCE);
    char b = c.step == 4 ? 'O' : 'X';
    if (write(fds[1], &b, 1) != 1) _exit(2);
    for (;;) pause();
  }
  close(fds[1]);
  char b = 0;
  bool got = read_byte(fds[0], &b, 20000);
  close(fds[0]);
  store_open(&f);
  if (!got || b != 'O') {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    cr_assert_fail("child did not hold the key");
  }
  begins(&f, 3, "killed", "fp");
  cr_assert_eq(f.busy, 3);
  kill(pid, SIGKILL);
  waitpid(pid, NULL, 0);
  int owners = 0;
  for (int round = 0; round < 200 && owners == 0; round++) {
    begins(&f, 10, "killed", "fp");
    owners = f.owners;
    if (owners == 0) uv_sleep(50);
  }
  cr_assert_eq(owners, 1, "exactly one new owner");
  cr_assert_eq(effects(&f), 0, "the dead transaction's effect rolled back");
  fx_finish(&f);
  drop(&f);
}
