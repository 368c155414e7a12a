/* 8 processes x 2,000 acquire/release pairs on one lock (the issue's
 * figures; KEEL_REDIS_STRESS_PAIRS changes the count) guarding a non-atomic
 * read-modify-write in PostgreSQL: zero overlaps (no lost update) and every
 * fenced update applies (fences strictly increase). */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "keel/redis.h"
#include "support/harness.h"

typedef struct fx {
  uv_loop_t loop;
  keel_redis *r;
} fx;

/* Many processes, one key, a non-atomic read-modify-write in PostgreSQL. */

typedef struct stress {
  fx x;
  PGconn *pg;
  const char *name;
  const char *table;
  int left;
  int bad;  /* fenced updates that touched 0 rows, or errors */
  int lost; /* releases that found the lock gone */
  keel_redis_lock_opts o;
} stress;

static void st_next(stress *s);

static void st_released(keel_redis_lock *l, int status, void *d) {
  (void)l;
  stress *s = d;
  if (status != 0) s->lost++;
  if (--s->left == 0) {
    keel_redis_close(s->x.r, NULL, NULL);
    return;
  }
  st_next(s);
}

static void st_acquired(keel_redis_lock *l, int status, void *d) {
  stress *s = d;
  if (status != 0) {
    s->bad++;
    s->left = 0;
    keel_redis_close(s->x.r, NULL, NULL);
    return;
  }
  uint64_t f = keel_redis_lock_fence(l);
  char sql[256];
  snprintf(sql, sizeof sql, "SELECT val FROM %s WHERE id = 1", s->table);
  PGresult *res = PQexec(s->pg, sql);
  long v = PQresultStatus(res) == PGRES_TUPLES_OK ? strtol(PQgetvalue(res, 0, 0), NULL, 10) : -1;
  PQclear(res);
  snprintf(sql, sizeof sql, "UPDATE %s SET val = %ld, fence = %llu WHERE id = 1 AND fence < %llu",
           s->table, v + 1, (unsigned long long)f, (unsigned long long)f);
  res = PQexec(s->pg, sql);
  if (v < 0 || PQresultStatus(res) != PGRES_COMMAND_OK || strcmp(PQcmdTuples(res), "1") != 0)
    s->bad++;
  PQclear(res);
  if (keel_redis_lock_release(l, st_released, s) != 0) s->bad++;
}

static void st_next(stress *s) {
  keel_redis_lock *l;
  if (keel_redis_lock_acquire(s->x.r, s->name, &s->o, st_acquired, s, &l) != 0) {
    s->bad++;
    keel_redis_close(s->x.r, NULL, NULL);
  }
}

static void child_stress(const char *name, const char *table, int pairs, int out_fd) {
  stress s;
  memset(&s, 0, sizeof s);
  s.name = name;
  s.table = table;
  s.left = pairs;
  s.pg = PQconnectdb(kt_pg_conninfo());
  if (PQstatus(s.pg) != CONNECTION_OK) _exit(81);
  char url[128];
  kt_redis_url(url, sizeof url);
  uv_loop_init(&s.x.loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  if (keel_redis_new(&s.x.loop, &o, &s.x.r) != 0) _exit(82);
  keel_redis_lock_opts_init(&s.o);
  s.o.ttl_ms = 10000;
  s.o.wait_ms = 120000;
  keel_backoff_full_jitter(&s.o.retry_backoff, 1, 2.0, 4);
  st_next(&s);
  uv_run(&s.x.loop, UV_RUN_DEFAULT);
  char line[64];
  snprintf(line, sizeof line, "%d %d %d\n", s.bad, s.lost, s.left);
  kt_pipe_write(out_fd, line);
  PQfinish(s.pg);
  _exit(uv_loop_close(&s.x.loop) == 0 ? 0 : 83);
}

Test(redis_stress, eight_processes_one_key_no_overlap_fences_increase, .timeout = 600) {
  const char *env = getenv("KEEL_REDIS_STRESS_PAIRS");
  int pairs = env != NULL ? (int)strtol(env, NULL, 10) : 2000;
  if (pairs <= 0) pairs = 2000;
  enum { NPROC = 8 };
  char name[64], table[64];
  kt_unique_name(name, sizeof name, "f8");
  kt_unique_name(table, sizeof table, "f8_counter");
  kt_pg_execf("CREATE TABLE %s (id int PRIMARY KEY, val bigint NOT NULL, fence bigint NOT NULL)",
              table);
  kt_pg_execf("INSERT INTO %s VALUES (1, 0, 0)", table);
  int p[2];
  cr_assert_eq(pipe(p), 0);
  pid_t pids[NPROC];
  for (int i = 0; i < NPROC; i++) {
    pids[i] = fork();
    cr_assert_neq(pids[i], -1);
    if (pids[i] == 0) {
      close(p[0]);
      child_stress(name, table, pairs, p[1]);
    }
  }
  close(p[1]);
  int bad = 0, lost = 0, left = 0;
  for (int i = 0; i < NPROC; i++) {
    char line[64];
    kt_pipe_read_line(p[0], line, sizeof line);
    int b, l, lf;
    cr_assert_eq(sscanf(line, "%d %d %d", &b, &l, &lf), 3);
    bad += b;
    lost += l;
    left += lf;
  }
  for (int i = 0; i < NPROC; i++) {
    int wst = 0;
    waitpid(pids[i], &wst, 0);
    cr_assert(WIFEXITED(wst) && WEXITSTATUS(wst) == 0, "child %d status %d", i, wst);
  }
  close(p[0]);
  cr_assert_eq(bad, 0, "%d fenced updates missed (overlap or fence not increasing)", bad);
  cr_assert_eq(lost, 0);
  cr_assert_eq(left, 0);
  char *val = kt_pg_scalarf("SELECT val FROM %s WHERE id = 1", table);
  char expect[32];
  snprintf(expect, sizeof expect, "%d", NPROC * pairs);
  cr_assert_str_eq(val, expect, "lost updates: overlapping holders");
  free(val);
  kt_pg_execf("DROP TABLE %s", table);
}
