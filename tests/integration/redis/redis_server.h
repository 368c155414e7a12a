/* Own redis-server instances for the tests that stop, restart or slow a
 * server (never the shared one of scripts/test): each listens on a unix
 * socket in /tmp and on no TCP port. */
#ifndef KT_REDIS_SERVER_H
#define KT_REDIS_SERVER_H

#include <sys/types.h>

typedef struct kt_redis_server {
  pid_t pid;      /* 0 when stopped */
  char path[108]; /* socket path */
  char url[160];  /* unix://<path> */
  char dir[64];   /* working directory */
} kt_redis_server;

/* Starts a server (fails the test when it does not answer within 5 s). */
void kt_redis_server_start(kt_redis_server *s);
/* Starts it again on the same socket after a stop. */
void kt_redis_server_restart(kt_redis_server *s);
/* SIGKILLs it and waits for it (no-op when stopped). */
void kt_redis_server_stop(kt_redis_server *s);
/* Stops it and removes its directory. */
void kt_redis_server_destroy(kt_redis_server *s);
/* Runs one command synchronously on it (blocking hiredis; set-up only);
 * returns the integer reply or -1. */
long long kt_redis_server_cmd(const kt_redis_server *s, const char *cmd);

#endif
