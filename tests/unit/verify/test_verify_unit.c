/* Verifier cores without I/O: options validation, SQL text for keyset
 * batches (single and composite keys, bounds, extra WHERE, quoting),
 * checkpoint and lock statements, problem-code counting and top N, row
 * access and copies. */
#include <criterion/criterion.h>
#include <string.h>

#include "keel/verify.h"
#include "support/harness.h"
#include "verify/verify_internal.h"

static bool ok_validator(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)row, (void)data;
  return true;
}

static keel_verify_opts base(void) {
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.conninfo = "host=127.0.0.1";
  o.table = "orders";
  o.validate = ok_validator;
  return o;
}

Test(verify_opts, defaults) {
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  cr_expect_eq(o.batch_size, 1000);
  cr_expect_eq(o.interval_ms, 3600000);
  cr_expect_eq(o.fix_concurrency, 4);
  cr_expect_eq(o.fix_max_retries, 3);
  cr_expect_eq(o.fix_timeout_ms, 30000);
  cr_expect_str_eq(o.id_columns[0], "id");
  cr_expect_null(o.id_columns[1]);
  cr_expect(o.run_on_start);
  cr_expect(o.bound_run);
  cr_expect_not(o.leader_lock);
  cr_expect_eq(o.checkpoint_every, 10);
  cr_expect_null(o.columns);
  cr_expect_eq(o.run_timeout_ms, 3600000);
  cr_expect_eq(o.fix_max_waiting, 10000);
}

Test(verify_opts, opts_init_zeroes_the_whole_struct) {
  keel_verify_opts o;
  memset(&o, 0xa5, sizeof o);
  keel_verify_opts_init(&o);
  for (size_t i = 0; i < sizeof o.reserved_ / sizeof o.reserved_[0]; i++)
    cr_expect_eq(o.reserved_[i], 0);
  cr_expect_null(o.pool);
  cr_expect_null(o.on_run_done);
  cr_expect_null(o.data);
  cr_expect_eq(sizeof o.reserved_, 64);
  keel_verify_stats st;
  cr_expect_eq(sizeof st.reserved_, 64);
}

Test(verify_opts, valid_base) {
  keel_verify_opts o = base();
  const char *why = NULL;
  cr_expect_eq(keel_verify_validate_opts(&o, &why), 0);
}

#define EXPECT_BAD(mutation, text)                                                     \
  do {                                                                                 \
    keel_verify_opts o = base();                                                       \
    mutation;                                                                          \
    const char *why = NULL;                                                            \
    cr_expect_eq(keel_verify_validate_opts(&o, &why), UV_EINVAL, "%s", #mutation);     \
    cr_expect(why != NULL && strstr(why, text) != NULL, "%s: why=%s", #mutation, why); \
  } while (0)

Test(verify_opts, invalid) {
  EXPECT_BAD(o.table = NULL, "table is required");
  EXPECT_BAD(o.table = "", "table is required");
  EXPECT_BAD(o.table = "a.b.c", "table is not a valid identifier");
  EXPECT_BAD(o.table = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
             "table is not a valid identifier");
  EXPECT_BAD(o.batch_size = 0, "batch_size");
  EXPECT_BAD(o.batch_size = 2000000, "batch_size");
  EXPECT_BAD(o.interval_ms = 0, "interval_ms");
  EXPECT_BAD(o.validate = NULL, "validate is required");
  EXPECT_BAD(o.fix_concurrency = 0, "fix_concurrency");
  EXPECT_BAD((o.conninfo = NULL, o.pool = NULL), "pool or a conninfo");
  EXPECT_BAD(o.id_columns[0] = NULL, "id_columns is empty");
  EXPECT_BAD(o.id_columns[0] = "", "id column");
  EXPECT_BAD(o.id_columns[0] = "s.id", "id column");
  EXPECT_BAD((o.id_columns[0] = "a", o.id_columns[1] = "a"), "twice");
  static const char *const empty_cols[] = {NULL};
  EXPECT_BAD(o.columns = empty_cols, "columns is empty");
  static const char *const bad_cols[] = {"status", "x.y", NULL};
  EXPECT_BAD(o.columns = bad_cols, "column name");
  EXPECT_BAD(o.fix_backoff.factor = 0.5, "");
  EXPECT_BAD(o.checkpoint_table = "", "checkpoint_table");
  EXPECT_BAD((o.checkpoint_table = "ck", o.checkpoint_every = 0), "checkpoint_every");
  EXPECT_BAD((o.checkpoint_table = "ck", o.job_name = ""), "job_name");
}

Test(verify_opts, new_rejects_without_touching_out) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_verify *v = (keel_verify *)(uintptr_t)0x1;
  keel_verify_opts o = base();
  o.batch_size = 0;
  cr_expect_eq(keel_verify_new(&loop, &o, &v), UV_EINVAL);
  cr_expect_eq(v, (keel_verify *)(uintptr_t)0x1);
  char why[128] = "";
  cr_expect_eq(keel_verify_new_ex(&loop, &o, &v, why, sizeof why), UV_EINVAL);
  cr_expect_str_eq(why, "batch_size must be 1..1000000");
  cr_expect_eq(v, (keel_verify *)(uintptr_t)0x1);
  cr_expect_eq(keel_verify_new(NULL, &o, &v), UV_EINVAL);
  cr_expect_eq(keel_verify_new(&loop, NULL, &v), UV_EINVAL);
  o = base();
  cr_expect_eq(keel_verify_new(&loop, &o, NULL), UV_EINVAL);
  cr_expect_eq(keel_verify_start(NULL), UV_EINVAL);
  cr_expect_eq(keel_verify_stop(NULL), UV_EINVAL);
  cr_expect_eq(keel_verify_run_now(NULL), UV_EINVAL);
  cr_expect_eq(keel_verify_fix_done(NULL, 0), UV_EINVAL);
  cr_expect_eq(keel_verify_fix_attempt(NULL), 0);
  keel_verify_close(NULL, NULL, NULL);
  keel_verify_get_stats(NULL, NULL);
  cr_expect_str_eq(keel_verify_last_error(NULL), "");
  kt_loop_finish(&loop);
}

/* ---- SQL ---------------------------------------------------------------- */

Test(verify_sql, single_key_bounded) {
  keel_verify_opts o = base();
  keel__vsql s;
  cr_assert_eq(keel__vsql_build(&s, &o, NULL), 0);
  cr_expect_eq(s.nkeys, 1);
  cr_expect_str_eq(s.batch_first,
                   "SELECT * FROM \"orders\" WHERE \"id\" <= $1 ORDER BY \"id\" LIMIT 1000");
  cr_expect_str_eq(s.batch_next,
                   "SELECT * FROM \"orders\" WHERE \"id\" > $1 AND \"id\" <= $2 "
                   "ORDER BY \"id\" LIMIT 1000");
  cr_expect_str_eq(s.max_key, "SELECT \"id\" FROM \"orders\" ORDER BY \"id\" DESC LIMIT 1");
  cr_expect(strstr(s.lock, "pg_try_advisory_lock($1::bigint)") != NULL);
  cr_expect_null(s.ckpt_create);
  cr_expect(strstr(s.batch_next, "OFFSET") == NULL);
  keel__vsql_free(&s);
}

Test(verify_sql, unbounded_with_where) {
  keel_verify_opts o = base();
  o.bound_run = false;
  o.where = "status <> 'archived'";
  o.batch_size = 50;
  keel__vsql s;
  cr_assert_eq(keel__vsql_build(&s, &o, NULL), 0);
  cr_expect_str_eq(s.batch_first,
                   "SELECT * FROM \"orders\" WHERE (status <> 'archived') "
                   "ORDER BY \"id\" LIMIT 50");
  cr_expect_str_eq(s.batch_next,
                   "SELECT * FROM \"orders\" WHERE \"id\" > $1 AND "
                   "(status <> 'archived') ORDER BY \"id\" LIMIT 50");
  cr_expect_str_eq(s.max_key,
                   "SELECT \"id\" FROM \"orders\" WHERE (status <> 'archived') "
                   "ORDER BY \"id\" DESC LIMIT 1");
  keel__vsql_free(&s);
}

Test(verify_sql, composite_key_columns_and_quoting) {
  keel_verify_opts o = base();
  o.table = "app.Order\"s";
  o.id_columns[0] = "tenant";
  o.id_columns[1] = "Seq";
  static const char *const cols[] = {"status", "select", NULL};
  o.columns = cols;
  keel__vsql s;
  cr_assert_eq(keel__vsql_build(&s, &o, NULL), 0);
  cr_expect_eq(s.nkeys, 2);
  cr_expect_str_eq(s.batch_next,
                   "SELECT \"status\", \"select\", \"tenant\", \"Seq\" FROM \"app\".\"Order\"\"s\" "
                   "WHERE (\"tenant\", \"Seq\") > ($1, $2) AND (\"tenant\", \"Seq\") <= ($3, $4) "
                   "ORDER BY \"tenant\", \"Seq\" LIMIT 1000");
  cr_expect_str_eq(s.max_key,
                   "SELECT \"tenant\", \"Seq\" FROM \"app\".\"Order\"\"s\" ORDER BY "
                   "\"tenant\" DESC, \"Seq\" DESC LIMIT 1");
  keel__vsql_free(&s);
}

Test(verify_sql, key_already_in_columns_is_not_repeated) {
  keel_verify_opts o = base();
  static const char *const cols[] = {"id", "status", NULL};
  o.columns = cols;
  o.bound_run = false;
  keel__vsql s;
  cr_assert_eq(keel__vsql_build(&s, &o, NULL), 0);
  cr_expect_str_eq(s.batch_first,
                   "SELECT \"id\", \"status\" FROM \"orders\" ORDER BY \"id\" LIMIT 1000");
  keel__vsql_free(&s);
}

Test(verify_sql, checkpoint_statements) {
  keel_verify_opts o = base();
  o.checkpoint_table = "keel.verify_progress";
  o.id_columns[0] = "a";
  o.id_columns[1] = "b";
  keel__vsql s;
  cr_assert_eq(keel__vsql_build(&s, &o, NULL), 0);
  cr_expect(strstr(s.ckpt_create, "CREATE TABLE IF NOT EXISTS \"keel\".\"verify_progress\"") !=
            NULL);
  cr_expect_str_eq(s.ckpt_load,
                   "SELECT last_key[1], last_key[2] FROM \"keel\".\"verify_progress\" "
                   "WHERE job = $1 AND last_key IS NOT NULL");
  cr_expect(strstr(s.ckpt_save, "ARRAY[$2::text, $3::text]") != NULL);
  cr_expect(strstr(s.ckpt_save, "ON CONFLICT (job)") != NULL);
  cr_expect(strstr(s.ckpt_clear, "SET last_key = NULL") != NULL);
  keel__vsql_free(&s);
}

Test(verify_sql, rejects_bad_identifiers) {
  keel_verify_opts o = base();
  o.id_columns[0] = "x.y";
  keel__vsql s;
  const char *why = NULL;
  cr_expect_eq(keel__vsql_build(&s, &o, &why), UV_EINVAL);
  cr_expect_not_null(why);
  cr_expect_null(s.batch_first);
}

Test(verify_sql, lock_key_is_stable_positive_and_table_specific) {
  int64_t a = keel__verify_lock_key("orders");
  cr_expect_gt(a, 0);
  cr_expect_eq(a, keel__verify_lock_key("orders"));
  cr_expect_neq(a, keel__verify_lock_key("orders2"));
}

Test(verify_sql, builds_under_failing_allocator) {
  kt_alloc_install();
  keel_verify_opts o = base();
  o.checkpoint_table = "ck";
  for (int64_t i = 0; i < 64; i++) {
    kt_alloc_fail_after(i);
    keel__vsql s;
    int rc = keel__vsql_build(&s, &o, NULL);
    kt_alloc_fail_after(-1);
    cr_expect(rc == 0 || rc == UV_ENOMEM);
    if (rc == 0)
      keel__vsql_free(&s);
    else
      cr_expect_null(s.batch_first);
  }
  cr_expect_eq(kt_alloc_live_blocks(), 0);
}

/* ---- problem codes ---------------------------------------------------------- */

Test(verify_codes, counts_and_top_n) {
  keel__vcodes c;
  keel__vcodes_init(&c);
  for (int i = 0; i < 5; i++) keel__vcodes_add(&c, "missing_completion_date");
  for (int i = 0; i < 9; i++) keel__vcodes_add(&c, "missing_payment_id");
  keel__vcodes_add(&c, "missing_status");
  keel_verify_code_count out[2];
  cr_assert_eq(keel__vcodes_top(&c, out, 2), 2);
  cr_expect_str_eq(out[0].code, "missing_payment_id");
  cr_expect_eq(out[0].total, 9);
  cr_expect_eq(out[0].last_run, 0);
  cr_expect_str_eq(out[1].code, "missing_completion_date");
  keel__vcodes_end_run(&c);
  keel__vcodes_add(&c, "missing_status");
  keel_verify_code_count all[KEEL_VERIFY_TOP_CODES];
  cr_assert_eq(keel__vcodes_top(&c, all, KEEL_VERIFY_TOP_CODES), 3);
  cr_expect_str_eq(all[2].code, "missing_status");
  cr_expect_eq(all[2].total, 2);
  cr_expect_eq(all[2].last_run, 1);
  cr_expect_eq(all[0].last_run, 9);
  keel__vcodes_end_run(&c);
  keel__vcodes_top(&c, all, KEEL_VERIFY_TOP_CODES);
  cr_expect_eq(all[0].last_run, 0);
  cr_expect_eq(all[2].last_run, 1);
}

Test(verify_codes, overflow_goes_to_other_and_long_codes_truncate) {
  keel__vcodes c;
  keel__vcodes_init(&c);
  char code[32];
  for (int i = 0; i < KEEL_VERIFY_MAX_CODES + 10; i++) {
    snprintf(code, sizeof code, "c%d", i);
    keel__vcodes_add(&c, code);
  }
  for (int i = 0; i < 3; i++) keel__vcodes_add(&c, "new_after_full");
  keel_verify_code_count out[1];
  cr_assert_eq(keel__vcodes_top(&c, out, 1), 1);
  cr_expect_str_eq(out[0].code, "(other)");
  cr_expect_eq(out[0].total, 13);
  char longc[100];
  memset(longc, 'x', sizeof longc - 1);
  longc[99] = '\0';
  keel__vcodes_init(&c);
  keel__vcodes_add(&c, longc);
  keel__vcodes_add(&c, longc);
  cr_assert_eq(keel__vcodes_top(&c, out, 1), 1);
  cr_expect_eq(strlen(out[0].code), KEEL_VERIFY_CODE_MAX - 1);
  cr_expect_eq(out[0].total, 2);
}

/* ---- rows ------------------------------------------------------------------- */

Test(verify_rows, copied_row_access) {
  static const char *const names[] = {"id", "status", "payment_id"};
  static const char *const values[] = {"42", "paid", NULL};
  static const int keycols[] = {0};
  keel_verify_row r = {
      .ncols = 3, .names = names, .values = values, .keycols = keycols, .nkeys = 1};
  cr_expect_str_eq(keel_verify_row_get(&r, "status"), "paid");
  cr_expect_null(keel_verify_row_get(&r, "payment_id"));
  cr_expect(keel_verify_row_is_null(&r, "payment_id"));
  cr_expect(keel_verify_row_has(&r, "payment_id"));
  cr_expect_not(keel_verify_row_has(&r, "nope"));
  cr_expect(keel_verify_row_is_null(&r, "nope"));
  cr_expect_eq(keel_verify_row_ncols(&r), 3);
  cr_expect_str_eq(keel_verify_row_col_name(&r, 1), "status");
  cr_expect_null(keel_verify_row_col_name(&r, 3));
  cr_expect_null(keel_verify_row_value(&r, -1));
  char key[8];
  cr_expect_eq(keel_verify_row_key(&r, key, sizeof key), 2);
  cr_expect_str_eq(key, "42");
  /* outside a validator a problem cannot be named */
  cr_expect_eq(keel_verify_row_problem(&r, "x"), UV_EINVAL);
  cr_expect_null(keel_verify_row_get(NULL, "id"));
}

Test(verify_rows, composite_key_text_truncates) {
  static const char *const names[] = {"tenant", "seq", "v"};
  static const char *const values[] = {"acme", "1234567", "z"};
  static const int keycols[] = {0, 1};
  keel_verify_row r = {
      .ncols = 3, .names = names, .values = values, .keycols = keycols, .nkeys = 2};
  char key[8];
  cr_expect_eq(keel_verify_row_key(&r, key, sizeof key), 12);
  cr_expect_str_eq(key, "acme,12");
  char big[32];
  keel_verify_row_key(&r, big, sizeof big);
  cr_expect_str_eq(big, "acme,1234567");
  cr_expect_eq(keel_verify_row_key(&r, NULL, 0), 12);
}

/* ---- the run's state machine (run.c), without I/O ------------------------- */

static keel__vview scanning(void) {
  keel__vview s = {.running = true,
                   .scanning = true,
                   .has_fix = true,
                   .leader = true,
                   .fix_concurrency = 2,
                   .batch_size = 10};
  return s;
}

Test(verify_run, idle_and_requests) {
  keel__vview s = {0};
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
  s.run_requested = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_TAKE_REQUEST);
  s.lock_inflight = true; /* a lock request still out */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
  s.lock_cancel = true; /* ... from a dropped run: taken over */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_TAKE_REQUEST);
  s.cancel_req = true; /* stop's report comes first */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_REPORT_CANCELED);
  s.closing = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
}

Test(verify_run, fixes_before_fetches_and_bounds) {
  keel__vview s = scanning();
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_FETCH);
  s.fixes_pending = 3;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_START_FIX);
  s.fixes_active = 2; /* fix_concurrency reached */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_FETCH);
  s.fixes_pending = 10; /* batch_size rows wait for a slot: the scan pauses */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
  s.has_fix = false;
  s.fixes_pending = 0;
  s.fixes_active = 0;
  s.fetch_inflight = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
  s.scanning = false; /* checkpoint or largest key on its way */
  s.fetch_inflight = false;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
}

Test(verify_run, end_only_when_everything_finished) {
  keel__vview s = scanning();
  s.scan_done = true;
  s.fixes_waiting = 1; /* a retry is due later */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
  s.fixes_waiting = 0;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_END_RUN);
  s.scan_done = false;
  s.stopping = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_END_RUN);
  s.fetch_inflight = true; /* stopping waits for the batch on its way */
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_NONE);
}

Test(verify_run, leader_lost) {
  keel__vview s = scanning();
  s.leader_lock = true;
  s.lock_session_changed = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_LOSE_LEADER);
  s.leader = false;
  s.lock_session_changed = false;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_FAIL_NOT_LEADER);
  s.scan_done = true;
  cr_expect_eq(keel__vrun_next(&s), KEEL__VA_END_RUN);
}

/* Every row accessor with NULL, out-of-range columns and a NULL key part. */
Test(verify_rows, null_and_out_of_range) {
  cr_expect_eq(keel_verify_row_ncols(NULL), 0);
  cr_expect_null(keel_verify_row_col_name(NULL, 0));
  cr_expect_null(keel_verify_row_value(NULL, 0));
  cr_expect_not(keel_verify_row_has(NULL, "id"));
  cr_expect(keel_verify_row_is_null(NULL, "id"));
  cr_expect_eq(keel_verify_row_key(NULL, NULL, 0), UV_EINVAL);
  cr_expect_eq(keel_verify_row_problem(NULL, "x"), UV_EINVAL);

  static const char *const names[] = {"tenant", "id", "v"};
  static const char *const values[] = {NULL, "7", "z"};
  static const int keycols[] = {0, 1};
  keel_verify_row r = {
      .ncols = 3, .names = names, .values = values, .keycols = keycols, .nkeys = 2};
  cr_expect_null(keel_verify_row_get(&r, NULL));
  cr_expect_not(keel_verify_row_has(&r, NULL));
  cr_expect_null(keel_verify_row_col_name(&r, -1));
  cr_expect_null(keel_verify_row_value(&r, 3));
  cr_expect_str_eq(keel_verify_row_value(&r, 2), "z");
  char key[16];
  cr_expect_eq(keel_verify_row_key(&r, key, 5), 2, "a NULL key part is empty");
  cr_expect_str_eq(key, ",7");
  cr_expect_eq(keel_verify_row_key(&r, NULL, 4), UV_EINVAL, "a capacity without a buffer");
  cr_expect_eq(keel_verify_row_problem(&r, NULL), UV_EINVAL);
  cr_expect_eq(keel_verify_row_problem(&r, ""), UV_EINVAL);
}

static bool never_called(keel_verify *v, const keel_verify_row *row, void *data) {
  (void)v, (void)row, (void)data;
  return true;
}

/* Refusals the table of invalid options leaves out, each with its reason. */
Test(verify_opts, more_refusals) {
  keel_verify_opts_init(NULL); /* NULL-safe */
  const char *why = NULL;
  cr_expect_eq(keel_verify_validate_opts(NULL, &why), UV_EINVAL);
  cr_expect_str_eq(why, "opts is NULL");
  cr_expect_eq(keel_verify_validate_opts(NULL, NULL), UV_EINVAL, "why may be NULL");
  keel_verify_opts o;
  keel_verify_opts_init(&o);
  o.conninfo = "";
  o.table = "t";
  o.validate = never_called;
  cr_expect_eq(keel_verify_validate_opts(&o, &why), UV_EINVAL);
  cr_expect_str_eq(why, "a pool or a conninfo is required");
  o.conninfo = "host=x";
  static const char *many[KEEL_VERIFY_MAX_COLUMNS + 2];
  static char names[KEEL_VERIFY_MAX_COLUMNS + 1][16];
  for (int i = 0; i <= KEEL_VERIFY_MAX_COLUMNS; i++) {
    snprintf(names[i], sizeof names[i], "c%d", i);
    many[i] = names[i];
  }
  o.columns = many;
  cr_expect_eq(keel_verify_validate_opts(&o, &why), UV_EINVAL);
  cr_expect_str_eq(why, "too many columns");
  o.columns = NULL;
  static char keys[KEEL_VERIFY_MAX_KEYS][16];
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS; k++) {
    snprintf(keys[k], sizeof keys[k], "k%d", k);
    o.id_columns[k] = keys[k];
  }
  cr_expect_eq(keel_verify_validate_opts(&o, &why), 0, "every key slot used: %s", why);
  o.checkpoint_table = "ckpt";
  o.job_name = "";
  cr_expect_eq(keel_verify_validate_opts(&o, &why), UV_EINVAL);
  cr_expect_str_eq(why, "job_name is empty");
  o.job_name = "nightly";
  cr_expect_eq(keel_verify_validate_opts(&o, &why), 0, "%s", why);

  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_verify *v = (keel_verify *)&loop;
  char buf[128];
  cr_expect_eq(keel_verify_new_ex(NULL, &o, &v, buf, sizeof buf), UV_EINVAL);
  cr_expect_str_eq(buf, "loop and out are required");
  cr_expect_eq(keel_verify_new_ex(&loop, &o, NULL, buf, sizeof buf), UV_EINVAL);
  cr_expect_eq(v, (keel_verify *)&loop, "*out untouched");
  keel_verify_stats st;
  memset(&st, 0x42, sizeof st);
  keel_verify_get_stats(NULL, &st);
  cr_expect_eq(st.runs_started, 0x4242424242424242ull, "untouched");
  cr_expect_str_eq(keel_verify_last_error(NULL), "");
  keel_verify_close(NULL, NULL, NULL);
  kt_loop_finish(&loop);
}
