#include "redis_server.h"

#include <criterion/criterion.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void spawn(kt_redis_server *s) {
  pid_t pid = fork();
  cr_assert_neq(pid, -1);
  if (pid == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) {
      dup2(devnull, 1);
      dup2(devnull, 2);
    }
    execlp("redis-server", "redis-server", "--port", "0", "--unixsocket", s->path,
           "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", s->dir,
           "--enable-debug-command", "local", (char *)NULL);
    _exit(127);
  }
  s->pid = pid;
  for (int i = 0; i < 500; i++) {
    redisContext *c = redisConnectUnix(s->path);
    if (c != NULL && c->err == 0) {
      redisReply *rep = redisCommand(c, "PING");
      bool ok = rep != NULL && rep->type == REDIS_REPLY_STATUS;
      if (rep != NULL) freeReplyObject(rep);
      redisFree(c);
      if (ok) return;
    } else if (c != NULL) {
      redisFree(c);
    }
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  cr_assert_fail("redis-server on %s did not start", s->path);
}

void kt_redis_server_start(kt_redis_server *s) {
  static int n;
  memset(s, 0, sizeof *s);
  snprintf(s->dir, sizeof s->dir, "/tmp/kt_redis_%d_%d", (int)getpid(), n++);
  mkdir(s->dir, 0700);
  snprintf(s->path, sizeof s->path, "%s/redis.sock", s->dir);
  snprintf(s->url, sizeof s->url, "unix://%s", s->path);
  spawn(s);
}

void kt_redis_server_restart(kt_redis_server *s) {
  if (s->pid == 0) spawn(s);
}

void kt_redis_server_stop(kt_redis_server *s) {
  if (s->pid == 0) return;
  kill(s->pid, SIGKILL);
  waitpid(s->pid, NULL, 0);
  s->pid = 0;
  unlink(s->path);
}

void kt_redis_server_destroy(kt_redis_server *s) {
  kt_redis_server_stop(s);
  rmdir(s->dir);
}

long long kt_redis_server_cmd(const kt_redis_server *s, const char *cmd) {
  redisContext *c = redisConnectUnix(s->path);
  if (c == NULL || c->err != 0) {
    if (c != NULL) redisFree(c);
    return -1;
  }
  redisReply *rep = redisCommand(c, cmd);
  long long v = rep != NULL && rep->type == REDIS_REPLY_INTEGER ? rep->integer
                : rep != NULL && rep->type != REDIS_REPLY_ERROR ? 0
                                                                : -1;
  if (rep != NULL) freeReplyObject(rep);
  redisFree(c);
  return v;
}
