/* Blocking HTTP and WebSocket clients for the serve tests: they run on a
 * thread of their own while the test's loop serves. */
#ifndef KEEL_TEST_SERVE_CLIENT_H
#define KEEL_TEST_SERVE_CLIENT_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

static int tc_connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static bool tc_send_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n > 0) {
    ssize_t m = send(fd, c, n, MSG_NOSIGNAL);
    if (m <= 0) return false;
    c += m;
    n -= (size_t)m;
  }
  return true;
}

/* Sends raw request text, reads the reply until the server closes or the
 * body (Content-Length) is complete. Returns a malloc'ed NUL-terminated
 * reply ("" when the connection closed without a reply); *status gets the
 * HTTP status (0 when none). */
static char *tc_http_raw(int port, const char *req, size_t req_len, int *status) {
  *status = 0;
  int fd = tc_connect(port);
  if (fd < 0) return NULL;
  char *buf = malloc(1);
  size_t len = 0;
  buf[0] = '\0';
  if (!tc_send_all(fd, req, req_len)) {
    /* the server may have closed already: read what it said */
  }
  for (;;) {
    char tmp[65536];
    ssize_t m = recv(fd, tmp, sizeof tmp, 0);
    if (m <= 0) break;
    buf = realloc(buf, len + (size_t)m + 1);
    memcpy(buf + len, tmp, (size_t)m);
    len += (size_t)m;
    buf[len] = '\0';
    char *hend = strstr(buf, "\r\n\r\n");
    if (hend != NULL) {
      const char *cl = strcasestr(buf, "content-length:");
      if (cl != NULL && cl < hend) {
        size_t want = (size_t)strtoul(cl + 15, NULL, 10);
        if (len >= (size_t)(hend + 4 - buf) + want) break;
      }
    }
  }
  close(fd);
  if (strncmp(buf, "HTTP/1.", 7) == 0) *status = atoi(buf + 9);
  return buf;
}

static char *tc_get(int port, const char *path, const char *extra_headers, int *status) {
  char req[2048];
  int n =
      snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sConnection: close\r\n\r\n",
               path, extra_headers ? extra_headers : "");
  return tc_http_raw(port, req, (size_t)n, status);
}

static const char *tc_body(const char *reply) {
  const char *b = strstr(reply, "\r\n\r\n");
  return b ? b + 4 : "";
}

/* Opens a WebSocket on path; returns the fd after the 101, or -1. */
static int tc_ws_open(int port, const char *path, int *status) {
  int fd = tc_connect(port);
  *status = 0;
  if (fd < 0) return -1;
  char req[1024];
  int n = snprintf(req, sizeof req,
                   "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n",
                   path);
  if (!tc_send_all(fd, req, (size_t)n)) {
    close(fd);
    return -1;
  }
  char hdr[4096];
  size_t len = 0;
  while (len + 1 < sizeof hdr) {
    ssize_t m = recv(fd, hdr + len, 1, 0);
    if (m <= 0) break;
    len++;
    hdr[len] = '\0';
    if (len >= 4 && memcmp(hdr + len - 4, "\r\n\r\n", 4) == 0) break;
  }
  hdr[len] = '\0';
  if (strncmp(hdr, "HTTP/1.", 7) == 0) *status = atoi(hdr + 9);
  if (*status != 101) {
    close(fd);
    return -1;
  }
  return fd;
}

static bool tc_recv_n(int fd, void *p, size_t n) {
  char *c = p;
  while (n > 0) {
    ssize_t m = recv(fd, c, n, 0);
    if (m <= 0) return false;
    c += m;
    n -= (size_t)m;
  }
  return true;
}

/* Reads one server message (reassembling fragments: large frames come as
 * a text frame and continuation frames); returns its malloc'ed payload
 * (NUL-terminated) or NULL. */
static char *tc_ws_read(int fd, size_t *len_out) {
  char *msg = NULL;
  size_t total = 0;
  for (;;) {
    unsigned char h[2];
    if (!tc_recv_n(fd, h, 2)) break;
    uint64_t len = h[1] & 0x7f;
    if (len == 126) {
      unsigned char e[2];
      if (!tc_recv_n(fd, e, 2)) break;
      len = ((uint64_t)e[0] << 8) | e[1];
    } else if (len == 127) {
      unsigned char e[8];
      if (!tc_recv_n(fd, e, 8)) break;
      len = 0;
      for (int i = 0; i < 8; i++) len = (len << 8) | e[i];
    }
    char *p = realloc(msg, total + len + 1);
    if (p == NULL) break;
    msg = p;
    if (!tc_recv_n(fd, msg + total, len)) break;
    total += len;
    msg[total] = '\0';
    if (h[0] & 0x80) { /* FIN */
      if (len_out) *len_out = total;
      return msg;
    }
  }
  free(msg);
  return NULL;
}

/* Runs fn(arg) on a thread while the loop serves; returns when fn did. */
typedef struct tc_job {
  void (*fn)(void *arg);
  void *arg;
  uv_async_t async;
  atomic_bool done;
} tc_job;

static void *tc_thread(void *p) {
  tc_job *j = p;
  j->fn(j->arg);
  atomic_store(&j->done, true);
  uv_async_send(&j->async);
  return NULL;
}

static void tc_async_cb(uv_async_t *a) {
  (void)a;
}

static void tc_run(uv_loop_t *loop, void (*fn)(void *arg), void *arg) {
  tc_job j;
  memset(&j, 0, sizeof j);
  j.fn = fn;
  j.arg = arg;
  atomic_init(&j.done, false);
  uv_async_init(loop, &j.async, tc_async_cb);
  pthread_t t;
  pthread_create(&t, NULL, tc_thread, &j);
  while (!atomic_load(&j.done)) uv_run(loop, UV_RUN_ONCE);
  pthread_join(t, NULL);
  uv_close((uv_handle_t *)&j.async, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
}

#endif
