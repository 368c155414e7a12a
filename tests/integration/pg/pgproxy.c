/* See pgproxy.h. Test code: plain malloc (not keel's allocator), aborts on
 * impossible setup failures. */
#include "pgproxy.h"

#include <libpq-fe.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct pair {
  struct pgproxy *p;
  struct pair *next;
  uv_tcp_t client, server;
  uv_connect_t connect;
  int open;     /* handles not yet closed */
  bool cutting; /* closing both sides */
  char *buf;    /* server bytes not yet forwarded (incomplete message) */
  size_t len, cap;
  bool silent; /* server bytes are swallowed */
} pair;

struct pgproxy {
  uv_loop_t *loop;
  uv_tcp_t listener;
  bool listener_open;
  struct sockaddr_in upstream;
  pair *pairs;
  char tag[32];
  bool armed, after;
  int cuts;
  bool stopping;
  bool drop_notify;
  int dropped;
};

typedef struct write_req {
  uv_write_t req;
  pair *pr;
  bool then_cut;
  char data[];
} write_req;

static void maybe_free(pgproxy *p) {
  if (p->stopping && !p->listener_open && p->pairs == NULL) free(p);
}

static void on_pair_closed(uv_handle_t *h) {
  pair *pr = h->data;
  if (--pr->open > 0) return;
  pgproxy *p = pr->p;
  for (pair **link = &p->pairs; *link != NULL; link = &(*link)->next)
    if (*link == pr) {
      *link = pr->next;
      break;
    }
  free(pr->buf);
  free(pr);
  maybe_free(p);
}

static void cut(pair *pr) {
  if (pr->cutting) return;
  pr->cutting = true;
  uv_close((uv_handle_t *)&pr->client, on_pair_closed);
  uv_close((uv_handle_t *)&pr->server, on_pair_closed);
}

static void on_written(uv_write_t *req, int status) {
  write_req *w = (write_req *)req;
  (void)status;
  if (w->then_cut) cut(w->pr);
  free(w);
}

static void send_to(pair *pr, uv_tcp_t *to, const char *data, size_t len, bool then_cut) {
  if (pr->cutting) return;
  write_req *w = malloc(sizeof *w + len);
  if (w == NULL) abort();
  memcpy(w->data, data, len);
  w->pr = pr;
  w->then_cut = then_cut;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
  if (uv_write(&w->req, (uv_stream_t *)to, &b, 1, on_written) != 0) {
    free(w);
    cut(pr);
  }
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  buf->base = malloc(suggested);
  buf->len = buf->base != NULL ? suggested : 0;
}

static void on_client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  pair *pr = s->data;
  if (n > 0) send_to(pr, &pr->server, buf->base, (size_t)n, false);
  free(buf->base);
  if (n < 0) cut(pr);
}

/* Forwards every complete server message; cuts where armed. */
static void on_server_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  pair *pr = s->data;
  pgproxy *p = pr->p;
  if (n < 0) {
    free(buf->base);
    /* Forward what is buffered, then close. */
    if (pr->len > 0)
      send_to(pr, &pr->client, pr->buf, pr->len, true);
    else
      cut(pr);
    pr->len = 0;
    return;
  }
  if (pr->silent) {
    free(buf->base);
    return;
  }
  if (pr->len + (size_t)n > pr->cap) {
    pr->cap = (pr->len + (size_t)n) * 2;
    pr->buf = realloc(pr->buf, pr->cap);
    if (pr->buf == NULL) abort();
  }
  memcpy(pr->buf + pr->len, buf->base, (size_t)n);
  pr->len += (size_t)n;
  free(buf->base);
  size_t at = 0, sent = 0;
  while (pr->len - at >= 5 && !pr->cutting) {
    const unsigned char *m = (const unsigned char *)pr->buf + at;
    uint32_t mlen = ((uint32_t)m[1] << 24) | ((uint32_t)m[2] << 16) | ((uint32_t)m[3] << 8) | m[4];
    if (pr->len - at < 1 + (size_t)mlen) break;
    size_t end = at + 1 + mlen;
    if (p->drop_notify && m[0] == 'A') { /* NotificationResponse: lost */
      if (at > sent) send_to(pr, &pr->client, pr->buf + sent, at - sent, false);
      sent = at = end;
      p->dropped++;
      continue;
    }
    if (p->armed && m[0] == 'C' && mlen > 4 &&
        strncmp((const char *)m + 5, p->tag, strlen(p->tag)) == 0) {
      p->armed = false;
      p->cuts++;
      size_t upto = p->after ? end : at;
      /* Nothing after this point reaches either side. */
      uv_read_stop((uv_stream_t *)&pr->client);
      uv_read_stop((uv_stream_t *)&pr->server);
      if (upto > sent)
        send_to(pr, &pr->client, pr->buf + sent, upto - sent, true);
      else
        cut(pr);
      pr->len = 0;
      return;
    }
    at = end;
  }
  if (at > sent) send_to(pr, &pr->client, pr->buf + sent, at - sent, false);
  memmove(pr->buf, pr->buf + at, pr->len - at);
  pr->len -= at;
}

void pgproxy_drop_notifications(pgproxy *p, bool on) {
  p->drop_notify = on;
}

void pgproxy_silence_open_connections(pgproxy *p) {
  for (pair *pr = p->pairs; pr != NULL; pr = pr->next) pr->silent = true;
}

int pgproxy_dropped(const pgproxy *p) {
  return p->dropped;
}

static void on_upstream(uv_connect_t *req, int status) {
  pair *pr = req->data;
  if (status != 0 || pr->cutting) {
    cut(pr);
    return;
  }
  uv_read_start((uv_stream_t *)&pr->client, alloc_cb, on_client_read);
  uv_read_start((uv_stream_t *)&pr->server, alloc_cb, on_server_read);
}

static void on_accept(uv_stream_t *listener, int status) {
  pgproxy *p = listener->data;
  if (status != 0) return;
  pair *pr = calloc(1, sizeof *pr);
  if (pr == NULL) abort();
  pr->p = p;
  uv_tcp_init(p->loop, &pr->client);
  uv_tcp_init(p->loop, &pr->server);
  pr->client.data = pr->server.data = pr->connect.data = pr;
  pr->open = 2;
  pr->next = p->pairs;
  p->pairs = pr;
  if (uv_accept(listener, (uv_stream_t *)&pr->client) != 0 ||
      uv_tcp_connect(&pr->connect, &pr->server, (const struct sockaddr *)&p->upstream,
                     on_upstream) != 0)
    cut(pr);
}

pgproxy *pgproxy_start(uv_loop_t *loop, const char *conninfo, char *out, size_t cap) {
  pgproxy *p = calloc(1, sizeof *p);
  if (p == NULL) abort();
  p->loop = loop;
  char *err = NULL;
  PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
  if (opts == NULL) abort();
  const char *host = "127.0.0.1", *port = "5432", *user = "postgres", *dbname = "postgres";
  for (PQconninfoOption *o = opts; o->keyword != NULL; o++) {
    if (o->val == NULL) continue;
    if (strcmp(o->keyword, "host") == 0) host = o->val;
    if (strcmp(o->keyword, "port") == 0) port = o->val;
    if (strcmp(o->keyword, "user") == 0) user = o->val;
    if (strcmp(o->keyword, "dbname") == 0) dbname = o->val;
  }
  if (uv_ip4_addr(host, (int)strtol(port, NULL, 10), &p->upstream) != 0) abort();
  uv_tcp_init(loop, &p->listener);
  p->listener.data = p;
  p->listener_open = true;
  struct sockaddr_in any;
  uv_ip4_addr("127.0.0.1", 0, &any);
  if (uv_tcp_bind(&p->listener, (const struct sockaddr *)&any, 0) != 0) abort();
  if (uv_listen((uv_stream_t *)&p->listener, 16, on_accept) != 0) abort();
  struct sockaddr_storage name;
  int namelen = sizeof name;
  uv_tcp_getsockname(&p->listener, (struct sockaddr *)&name, &namelen);
  int local_port = ntohs(((struct sockaddr_in *)&name)->sin_port);
  snprintf(out, cap, "host=127.0.0.1 port=%d user=%s dbname=%s sslmode=disable gssencmode=disable",
           local_port, user, dbname);
  PQconninfoFree(opts);
  return p;
}

void pgproxy_cut_at(pgproxy *p, const char *tag, bool after) {
  snprintf(p->tag, sizeof p->tag, "%s", tag);
  p->after = after;
  p->armed = true;
}

int pgproxy_cuts(const pgproxy *p) {
  return p->cuts;
}

static void on_listener_closed(uv_handle_t *h) {
  pgproxy *p = h->data;
  p->listener_open = false;
  maybe_free(p);
}

void pgproxy_stop(pgproxy *p) {
  p->stopping = true;
  for (pair *pr = p->pairs; pr != NULL; pr = pr->next) cut(pr);
  uv_close((uv_handle_t *)&p->listener, on_listener_closed);
}
