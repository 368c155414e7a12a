/* A full restart of a private PostgreSQL server mid-stream: the listener
 * reconnects with backoff, LISTENs again, reports the gap, and later changes
 * reach the handler. The server is started here (initdb in a temporary
 * directory, as scripts/lib.sh does), never the shared test server. */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "keel/listen.h"
#include "support/harness.h"

typedef struct private_pg {
  char dir[64];
  char bindir[128];
  char conninfo[128];
  int port;
} private_pg;

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

static void private_pg_start(private_pg *p) {
  snprintf(p->dir, sizeof p->dir, "/tmp/keel-listen-XXXXXX");
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

static void private_pg_ctl(private_pg *p, const char *verb) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "%s%s/pg_ctl -D %s/data -l %s/data/server.log -w -t 60 -m fast -o \"-p %d -k %s "
           "-c listen_addresses=127.0.0.1 -c fsync=off\" %s >/dev/null 2>&1",
           as_pg(), p->bindir, p->dir, p->dir, p->port, p->dir, verb);
  cr_assert_eq(system(cmd), 0, "pg_ctl %s failed", verb);
}

static void private_pg_exec(private_pg *p, const char *sql) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "psql -X -q -v ON_ERROR_STOP=1 \"%s\" -c \"%s\" >/dev/null",
           p->conninfo, sql);
  cr_assert_eq(system(cmd), 0, "psql: %s", sql);
}

static void private_pg_destroy(private_pg *p) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "%s%s/pg_ctl -D %s/data -m immediate stop >/dev/null 2>&1; rm -rf %s",
           as_pg(), p->bindir, p->dir, p->dir);
  if (system(cmd) != 0) fprintf(stderr, "cleanup of %s failed\n", p->dir);
}

typedef struct state {
  int count;
  char names[16][32];
  int gaps;
  uint64_t gap_ms;
} state;

static void handler(keel_listener *l, const keel_change *c, void *data) {
  (void)l;
  state *s = data;
  const char *name = keel_change_new(c, "name");
  if (s->count < 16) snprintf(s->names[s->count], 32, "%s", name ? name : "(null)");
  s->count++;
}

static void on_gap(keel_listener *l, uint64_t ms, void *data) {
  (void)l;
  state *s = data;
  s->gaps++;
  s->gap_ms = ms;
}

static void run_until(uv_loop_t *loop, const int *value, int want) {
  uint64_t start = uv_now(loop);
  while (*value < want && uv_now(loop) - start < 20000) uv_run(loop, UV_RUN_ONCE);
  cr_assert_geq(*value, want, "waited for %d, got %d", want, *value);
}

Test(listen_restart, full_server_restart_mid_stream, .timeout = 90) {
  private_pg p;
  private_pg_start(&p);
  private_pg_ctl(&p, "start");
  char sql[512];
  char sqlbuf[8192];
  private_pg_exec(&p, "CREATE TABLE items (id serial PRIMARY KEY, name text)");
  int n = keel_listener_install_sql(sqlbuf, sizeof sqlbuf, "items", "id", "items_changes");
  cr_assert_gt(n, 0);
  FILE *f = NULL;
  snprintf(sql, sizeof sql, "psql -X -q -v ON_ERROR_STOP=1 \"%s\" >/dev/null", p.conninfo);
  f = popen(sql, "w");
  cr_assert_not_null(f);
  fputs(sqlbuf, f);
  cr_assert_eq(pclose(f), 0, "installing the trigger");

  uv_loop_t loop;
  uv_loop_init(&loop);
  state s = {0};
  keel_listener_opts o;
  keel_listener_opts_init(&o);
  o.conninfo = p.conninfo;
  o.table = "public.items";
  o.channel = "items_changes";
  o.heartbeat_ms = 500;
  o.connect_timeout_ms = 1000;
  keel_backoff_fixed(&o.reconnect_backoff, 100);
  o.on_gap = on_gap;
  o.data = &s;
  keel_listener *l;
  cr_assert_eq(keel_listener_new(&loop, &o, &l), 0);
  cr_assert_eq(keel_listener_on(l, "h", handler, &s), 0);
  cr_assert_eq(keel_listener_start(l), 0);
  uint64_t start = uv_now(&loop);
  while (!keel_listener_is_active(l) && uv_now(&loop) - start < 10000) uv_run(&loop, UV_RUN_ONCE);
  cr_assert(keel_listener_is_active(l));

  private_pg_exec(&p, "INSERT INTO items (name) VALUES ('before')");
  run_until(&loop, &s.count, 1);
  cr_assert_str_eq(s.names[0], "before");

  private_pg_ctl(&p, "restart"); /* the loop is not running: the old socket is dead */
  run_until(&loop, &s.gaps, 1);
  cr_assert(keel_listener_is_active(l));
  cr_assert_eq(s.gaps, 1);

  private_pg_exec(&p, "INSERT INTO items (name) VALUES ('after')");
  run_until(&loop, &s.count, 2);
  cr_assert_str_eq(s.names[1], "after");
  keel_listener_stats st;
  keel_listener_get_stats(l, &st);
  cr_assert_geq(st.reconnects, 1);
  cr_assert_eq(st.gaps, 1);
  cr_assert_eq(st.delivered, 2);

  keel_listener_close(l, NULL, NULL);
  kt_loop_finish(&loop);
  private_pg_destroy(&p);
}
