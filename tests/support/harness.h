/*
 * Test support shared by every suite: the addresses of the throwaway
 * PostgreSQL and Redis that scripts/test starts, unique names so that
 * parallel tests never share a table, a counting/failing allocator, and
 * loop helpers.
 */
#ifndef KEEL_TEST_HARNESS_H
#define KEEL_TEST_HARNESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

/* Conninfo of the test PostgreSQL (KEEL_TEST_PG); in the pooler pass
 * (KEEL_TEST_VIA_POOLER=1, meson suite 'pooler') the PgBouncer in
 * transaction mode in front of it (KEEL_TEST_PG_POOLER). Fails the current
 * test (never skips) when the variable is not set. */
const char *kt_pg_conninfo(void);

/* Conninfo of the server itself, never through the pooler (KEEL_TEST_PG):
 * for checks such as pg_stat_activity and pg_terminate_backend. */
const char *kt_pg_direct_conninfo(void);

/* Conninfo through PgBouncer in transaction mode (KEEL_TEST_PG_POOLER),
 * whichever pass runs; fails the current test when not set. */
const char *kt_pg_pooler_conninfo(void);

/* true in the pooler pass: the suite runs a second time with
 * kt_pg_conninfo() pointing at PgBouncer in transaction mode. */
bool kt_behind_pooler(void);

/* Ends the current test as skipped in the pooler pass only, with the
 * reason (what the test needs that a transaction pooler cannot give:
 * LISTEN, a session advisory lock, the own backend's pid...). Criterion
 * reports it as skipped; meson sees a passing executable. */
#define KT_SKIP_BEHIND_POOLER(reason)                                                     \
  do {                                                                                    \
    if (kt_behind_pooler()) cr_skip_test("not through a transaction pooler: %s", reason); \
  } while (0)

/* Redis host and port from KEEL_TEST_REDIS ("127.0.0.1:6379"); fails the
 * current test when not set. */
void kt_redis_addr(char *host, size_t host_cap, int *port);

/* "redis://<host>:<port>" of KEEL_TEST_REDIS into buf (fails the current
 * test like kt_redis_addr()). */
void kt_redis_url(char *buf, size_t cap);

/* Child processes of a test report to it through a pipe, one line each.
 * kt_pipe_write() writes all of s to fd (the child exits with 90 when it
 * cannot); kt_pipe_read_line() reads one line, without its '\n', into buf
 * (fails the test when the pipe closes first). */
void kt_pipe_write(int fd, const char *s);
void kt_pipe_read_line(int fd, char *buf, size_t cap);

/* Writes a name unique to this process and call ("kt_<prefix>_<pid>_<n>")
 * usable as a table or channel name. */
void kt_unique_name(char *buf, size_t cap, const char *prefix);

/* Runs a SQL statement synchronously on a fresh blocking libpq connection
 * (set-up and checks only, never inside the loop under test). Fails the test
 * on error. */
void kt_pg_exec(const char *sql);

/* Like kt_pg_exec but returns the first column of the first row as a
 * malloc'd string (NULL for no row or NULL value); caller frees with free(). */
char *kt_pg_scalar(const char *sql);

/* printf-style kt_pg_exec and kt_pg_scalar (statements up to 2 KB). */
void kt_pg_execf(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
char *kt_pg_scalarf(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

/* Runs the loop until cond(ctx) holds or timeout_ms passes (loop time, a
 * guard timer keeps the loop from blocking forever); returns cond(ctx). */
typedef bool (*kt_cond_fn)(void *ctx);
bool kt_wait_for(uv_loop_t *loop, kt_cond_fn cond, void *ctx, uint64_t timeout_ms);

/* Runs the loop until `done` becomes true or timeout_ms passes (real time);
 * returns whether done became true. */
bool kt_run_until(uv_loop_t *loop, const volatile bool *done, uint64_t timeout_ms);

/* Closes every handle still open, runs the loop until it ends and asserts
 * uv_loop_close() == 0. Use at the end of each loop test. */
void kt_loop_finish(uv_loop_t *loop);

/* ---- counting / failing allocator (keel_replace_allocator) ------------- */

/* Installs the counting allocator. Allocations counted in kt_alloc_count();
 * live bytes in kt_alloc_live_bytes(). */
void kt_alloc_install(void);
uint64_t kt_alloc_count(void);
int64_t kt_alloc_live_bytes(void);
int64_t kt_alloc_live_blocks(void);
/* After n more successful allocations, every allocation fails (n < 0: never). */
void kt_alloc_fail_after(int64_t n);
/* The allocation attempt number n from now (0: the next one) fails; the ones
 * before and after it succeed (n < 0: disarm). Independent of
 * kt_alloc_fail_after. */
void kt_alloc_fail_nth(int64_t n);

/* ---- allocation failure as an input (nghttp2's TEST_FAILMALLOC_RUN) ----- */

/*
 * Installs the counting allocator and runs scenario(arg):
 *   1. once with no failure, counting its allocation attempts (n);
 *   2. then, for every i in 0..n-1, once with only the i-th allocation
 *      failing (the code must recover or fail cleanly and go on), and once
 *      with the i-th and every later allocation failing (cleanup paths that
 *      allocate).
 * After every run, live blocks must be back to their value before the run
 * (asserted: nothing leaked). The scenario must be repeatable: set up and
 * tear down its own loop (end with kt_loop_finish) and objects each time,
 * and accept a clean error (UV_ENOMEM, or the documented error of a failed
 * step) wherever an allocation can fail; kt_failmalloc_index() tells it
 * which run it is in. Allocation failures are disarmed when it returns.
 */
void kt_failmalloc_run(void (*scenario)(void *arg), void *arg);

/* Inside kt_failmalloc_run: -1 during the counting run, else the index i of
 * the allocation that fails in this run. -1 outside. */
int64_t kt_failmalloc_index(void);

/* Inside kt_failmalloc_run: true when every allocation from the index on
 * fails (second mode), false when only that one fails. */
bool kt_failmalloc_sticky(void);

/* Allocation attempts counted by the last kt_failmalloc_run's first run. */
uint64_t kt_failmalloc_count(void);

/* A private PostgreSQL server for tests that restart or stop one (the
 * shared server serves tests running in parallel): initdb into a temporary
 * directory (as the postgres user when root), on a free loopback port.
 * `settings` are extra server options ("-c fsync=off ..."), may be NULL. */
typedef struct kt_private_pg {
  char dir[64];
  char bindir[128];
  char conninfo[128];
  char settings[256];
  int port;
} kt_private_pg;
void kt_private_pg_init(kt_private_pg *p, const char *settings);
/* pg_ctl verb ("start", "stop", "restart") with shutdown mode ("fast",
 * "immediate"); fails the test when pg_ctl fails. */
void kt_private_pg_ctl(kt_private_pg *p, const char *verb, const char *mode);
/* Runs SQL through psql on the private server; fails the test on error. */
void kt_private_pg_exec(kt_private_pg *p, const char *sql);
/* Stops the server (immediate) and removes its directory. */
void kt_private_pg_destroy(kt_private_pg *p);

#endif
