#include "support/harness.h"

#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keel/common.h"

bool kt_behind_pooler(void) {
  const char *via = getenv("KEEL_TEST_VIA_POOLER");
  return via != NULL && strcmp(via, "1") == 0;
}

const char *kt_pg_direct_conninfo(void) {
  const char *conninfo = getenv("KEEL_TEST_PG");
  if (conninfo == NULL || conninfo[0] == '\0')
    cr_assert_fail("KEEL_TEST_PG is not set: run the suite with ./scripts/test");
  return conninfo;
}

const char *kt_pg_pooler_conninfo(void) {
  const char *conninfo = getenv("KEEL_TEST_PG_POOLER");
  if (conninfo == NULL || conninfo[0] == '\0')
    cr_assert_fail("KEEL_TEST_PG_POOLER is not set: run the suite with ./scripts/test");
  return conninfo;
}

const char *kt_pg_conninfo(void) {
  return kt_behind_pooler() ? kt_pg_pooler_conninfo() : kt_pg_direct_conninfo();
}

void kt_redis_addr(char *host, size_t host_cap, int *port) {
  const char *addr = getenv("KEEL_TEST_REDIS");
  if (addr == NULL || addr[0] == '\0')
    cr_assert_fail("KEEL_TEST_REDIS is not set: run the suite with ./scripts/test");
  const char *colon = strrchr(addr, ':');
  cr_assert_not_null(colon, "KEEL_TEST_REDIS must be host:port, got %s", addr);
  size_t host_len = (size_t)(colon - addr);
  cr_assert_lt(host_len, host_cap);
  memcpy(host, addr, host_len);
  host[host_len] = '\0';
  char *end = NULL;
  long value = strtol(colon + 1, &end, 10);
  cr_assert(end != colon + 1 && *end == '\0' && value > 0 && value < 65536,
            "bad port in KEEL_TEST_REDIS=%s", addr);
  *port = (int)value;
}

void kt_redis_url(char *buf, size_t cap) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  snprintf(buf, cap, "redis://%s:%d", host, port);
}

void kt_pipe_write(int fd, const char *s) {
  size_t n = strlen(s);
  while (n > 0) {
    ssize_t w = write(fd, s, n);
    if (w <= 0) _exit(90);
    s += w;
    n -= (size_t)w;
  }
}

void kt_pipe_read_line(int fd, char *buf, size_t cap) {
  size_t n = 0;
  while (n + 1 < cap) {
    ssize_t r = read(fd, buf + n, 1);
    cr_assert_gt(r, 0, "child pipe closed");
    if (buf[n] == '\n') break;
    n++;
  }
  buf[n] = '\0';
}

void kt_unique_name(char *buf, size_t cap, const char *prefix) {
  static atomic_uint counter;
  unsigned n = atomic_fetch_add(&counter, 1);
  snprintf(buf, cap, "kt_%s_%ld_%u", prefix, (long)getpid(), n);
}

static PGconn *connect_blocking(void) {
  /* Set-up and checks go to the server itself, also in the pooler pass. */
  PGconn *conn = PQconnectdb(kt_pg_direct_conninfo());
  if (PQstatus(conn) != CONNECTION_OK) {
    char message[512];
    snprintf(message, sizeof message, "%s", PQerrorMessage(conn));
    PQfinish(conn);
    cr_assert_fail("cannot connect to the test PostgreSQL: %s", message);
  }
  return conn;
}

void kt_pg_exec(const char *sql) {
  PGconn *conn = connect_blocking();
  PGresult *res = PQexec(conn, sql);
  ExecStatusType status = PQresultStatus(res);
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    char message[512];
    snprintf(message, sizeof message, "%s", PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(conn);
    cr_assert_fail("SQL failed: %s\n%s", sql, message);
  }
  PQclear(res);
  PQfinish(conn);
}

char *kt_pg_scalar(const char *sql) {
  PGconn *conn = connect_blocking();
  PGresult *res = PQexec(conn, sql);
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    char message[512];
    snprintf(message, sizeof message, "%s", PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(conn);
    cr_assert_fail("SQL failed: %s\n%s", sql, message);
  }
  char *value = NULL;
  if (PQntuples(res) > 0 && !PQgetisnull(res, 0, 0)) value = strdup(PQgetvalue(res, 0, 0));
  PQclear(res);
  PQfinish(conn);
  return value;
}

static void stop_on_timeout(uv_timer_t *timer) {
  *(bool *)timer->data = true;
}

bool kt_run_until(uv_loop_t *loop, const volatile bool *done, uint64_t timeout_ms) {
  uv_timer_t timer;
  bool timed_out = false;
  uv_timer_init(loop, &timer);
  timer.data = &timed_out;
  uv_timer_start(&timer, stop_on_timeout, timeout_ms, 0);
  uv_unref((uv_handle_t *)&timer);
  while (!*done && !timed_out) {
    if (uv_run(loop, UV_RUN_ONCE) == 0 && !*done) {
      /* Nothing referenced is left: only the timer could still fire. */
      uv_ref((uv_handle_t *)&timer);
      uv_run(loop, UV_RUN_ONCE);
      uv_unref((uv_handle_t *)&timer);
    }
  }
  uv_close((uv_handle_t *)&timer, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return *done;
}

static void close_any(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (!uv_is_closing(handle)) {
    cr_log_warn("closing a handle left open (type %s)", uv_handle_type_name(handle->type));
    uv_close(handle, NULL);
  }
}

void kt_loop_finish(uv_loop_t *loop) {
  uv_run(loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(loop);
  if (rc == UV_EBUSY) {
    uv_walk(loop, close_any, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0);
    cr_assert_fail("uv_loop_close() returned UV_EBUSY: handles were left open");
  }
  cr_assert_eq(rc, 0, "uv_loop_close() = %d", rc);
}

/* ---- counting allocator ------------------------------------------------ */

/* A header before each block remembers its size so frees can be counted. */
typedef struct {
  size_t size;
  size_t pad; /* keeps the payload 16-byte aligned */
} alloc_header;

static atomic_uint_fast64_t alloc_count;
static atomic_int_fast64_t live_bytes;
static atomic_int_fast64_t live_blocks;
static atomic_int_fast64_t fail_after = -1;
static atomic_int_fast64_t fail_nth = -1;
static atomic_uint_fast64_t alloc_attempts; /* successful or not */

static bool should_fail(void) {
  atomic_fetch_add(&alloc_attempts, 1);
  if (atomic_load(&fail_nth) >= 0 && atomic_fetch_sub(&fail_nth, 1) == 0) return true;
  int_fast64_t left = atomic_load(&fail_after);
  if (left < 0) return false;
  if (left == 0) return true;
  atomic_fetch_sub(&fail_after, 1);
  return false;
}

static void *count_malloc(size_t size) {
  if (should_fail()) return NULL;
  alloc_header *h = malloc(sizeof *h + size);
  if (h == NULL) return NULL;
  h->size = size;
  atomic_fetch_add(&alloc_count, 1);
  atomic_fetch_add(&live_bytes, (int_fast64_t)size);
  atomic_fetch_add(&live_blocks, 1);
  return h + 1;
}

static void count_free(void *ptr) {
  if (ptr == NULL) return;
  alloc_header *h = (alloc_header *)ptr - 1;
  atomic_fetch_sub(&live_bytes, (int_fast64_t)h->size);
  atomic_fetch_sub(&live_blocks, 1);
  free(h);
}

static void *count_realloc(void *ptr, size_t size) {
  if (ptr == NULL) return count_malloc(size);
  if (should_fail()) return NULL;
  alloc_header *old = (alloc_header *)ptr - 1;
  size_t old_size = old->size;
  alloc_header *h = realloc(old, sizeof *h + size);
  if (h == NULL) return NULL;
  h->size = size;
  atomic_fetch_add(&alloc_count, 1);
  atomic_fetch_add(&live_bytes, (int_fast64_t)size - (int_fast64_t)old_size);
  return h + 1;
}

static void *count_calloc(size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) return NULL;
  void *p = count_malloc(count * size);
  if (p != NULL) memset(p, 0, count * size);
  return p;
}

void kt_alloc_install(void) {
  keel_replace_allocator(count_malloc, count_realloc, count_calloc, count_free);
}

uint64_t kt_alloc_count(void) {
  return atomic_load(&alloc_count);
}

int64_t kt_alloc_live_bytes(void) {
  return atomic_load(&live_bytes);
}

int64_t kt_alloc_live_blocks(void) {
  return atomic_load(&live_blocks);
}

void kt_alloc_fail_after(int64_t n) {
  atomic_store(&fail_after, n);
}

void kt_alloc_fail_nth(int64_t n) {
  atomic_store(&fail_nth, n < 0 ? -1 : n);
}

/* ---- failmalloc runs ----------------------------------------------------- */

static int64_t failmalloc_index = -1;
static bool failmalloc_sticky;
static uint64_t failmalloc_count;

int64_t kt_failmalloc_index(void) {
  return failmalloc_index;
}

bool kt_failmalloc_sticky(void) {
  return failmalloc_sticky;
}

uint64_t kt_failmalloc_count(void) {
  return failmalloc_count;
}

static void failmalloc_once(void (*scenario)(void *arg), void *arg, int64_t index, bool sticky) {
  failmalloc_index = index;
  failmalloc_sticky = sticky;
  int64_t live_before = kt_alloc_live_blocks();
  int64_t bytes_before = kt_alloc_live_bytes();
  kt_alloc_fail_nth(-1);
  kt_alloc_fail_after(-1);
  if (index >= 0 && sticky)
    kt_alloc_fail_after(index);
  else if (index >= 0)
    kt_alloc_fail_nth(index);
  scenario(arg);
  kt_alloc_fail_nth(-1);
  kt_alloc_fail_after(-1);
  int64_t leaked_blocks = kt_alloc_live_blocks() - live_before;
  int64_t leaked_bytes = kt_alloc_live_bytes() - bytes_before;
  cr_assert_eq(leaked_blocks, 0, "failmalloc run %s%lld leaked %lld blocks (%lld bytes)",
               index < 0 ? "counting"
               : sticky  ? "failing from #"
                         : "failing only #",
               (long long)(index < 0 ? 0 : index), (long long)leaked_blocks,
               (long long)leaked_bytes);
}

void kt_failmalloc_run(void (*scenario)(void *arg), void *arg) {
  kt_alloc_install();
  uint64_t before = atomic_load(&alloc_attempts);
  failmalloc_once(scenario, arg, -1, false);
  uint64_t n = atomic_load(&alloc_attempts) - before;
  failmalloc_count = n;
  for (uint64_t i = 0; i < n; i++) {
    failmalloc_once(scenario, arg, (int64_t)i, false);
    failmalloc_once(scenario, arg, (int64_t)i, true);
  }
  failmalloc_index = -1;
  failmalloc_sticky = false;
}

void kt_pg_execf(const char *fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  kt_pg_exec(buf);
}

char *kt_pg_scalarf(const char *fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return kt_pg_scalar(buf);
}

static void kt_guard_expired(uv_timer_t *timer) {
  *(bool *)timer->data = true;
}

bool kt_wait_for(uv_loop_t *loop, kt_cond_fn cond, void *ctx, uint64_t timeout_ms) {
  uv_timer_t guard;
  bool expired = false;
  uv_timer_init(loop, &guard);
  guard.data = &expired;
  uv_timer_start(&guard, kt_guard_expired, timeout_ms, 0);
  while (!cond(ctx) && !expired) uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&guard, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return cond(ctx);
}

/* ---- a private PostgreSQL server ------------------------------------------- */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  cr_assert_eq(bind(fd, (struct sockaddr *)&addr, sizeof addr), 0);
  socklen_t len = sizeof addr;
  getsockname(fd, (struct sockaddr *)&addr, &len);
  close(fd);
  return ntohs(addr.sin_port);
}

static const char *as_pg(void) {
  return getuid() == 0 ? "runuser -u postgres -- " : "";
}

void kt_private_pg_init(kt_private_pg *p, const char *settings) {
  memset(p, 0, sizeof *p);
  snprintf(p->settings, sizeof p->settings, "%s", settings != NULL ? settings : "");
  snprintf(p->dir, sizeof p->dir, "/tmp/keel-pg-XXXXXX");
  cr_assert_not_null(mkdtemp(p->dir));
  FILE *f = popen("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1", "r");
  cr_assert_not_null(f);
  cr_assert_not_null(fgets(p->bindir, sizeof p->bindir, f));
  pclose(f);
  p->bindir[strcspn(p->bindir, "\n")] = '\0';
  char cmd[1024];
  if (getuid() == 0) {
    snprintf(cmd, sizeof cmd,
             "chmod 755 %s && mkdir %s/data && chown -R postgres:postgres %s && "
             "runuser -u postgres -- %s/initdb -D %s/data -U postgres -A trust -E UTF8 "
             "--no-locale >/dev/null 2>&1",
             p->dir, p->dir, p->dir, p->bindir, p->dir);
  } else {
    snprintf(cmd, sizeof cmd,
             "mkdir %s/data && %s/initdb -D %s/data -U postgres -A trust -E UTF8 --no-locale "
             ">/dev/null 2>&1",
             p->dir, p->bindir, p->dir);
  }
  cr_assert_eq(system(cmd), 0, "initdb failed");
  p->port = free_port();
  snprintf(p->conninfo, sizeof p->conninfo, "host=127.0.0.1 port=%d user=postgres dbname=postgres",
           p->port);
}

void kt_private_pg_ctl(kt_private_pg *p, const char *verb, const char *mode) {
  char cmd[1536];
  snprintf(cmd, sizeof cmd,
           "%s%s/pg_ctl -D %s/data -l %s/data/server.log -w -t 60 -m %s -o \"-p %d -k %s "
           "-c listen_addresses=127.0.0.1 -c fsync=off %s\" %s >/dev/null 2>&1",
           as_pg(), p->bindir, p->dir, p->dir, mode, p->port, p->dir, p->settings, verb);
  cr_assert_eq(system(cmd), 0, "pg_ctl %s failed", verb);
}

void kt_private_pg_exec(kt_private_pg *p, const char *sql) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "psql -X -q -v ON_ERROR_STOP=1 \"%s\" >/dev/null", p->conninfo);
  FILE *f = popen(cmd, "w");
  cr_assert_not_null(f);
  fputs(sql, f);
  cr_assert_eq(pclose(f), 0, "psql: %.200s", sql);
}

void kt_private_pg_destroy(kt_private_pg *p) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "%s%s/pg_ctl -D %s/data -m immediate stop >/dev/null 2>&1; rm -rf %s",
           as_pg(), p->bindir, p->dir, p->dir);
  if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", p->dir);
}
