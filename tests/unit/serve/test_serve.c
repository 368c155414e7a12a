/* keel_serve: /metrics, /stats.json, /ws, bad input, registration order,
 * allocation failure. Clients run on a thread of their own (client.h). */
#include <criterion/criterion.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client.h"
#include "support/harness.h"
#include "keel.h"

typedef struct fixture {
  uv_loop_t loop;
  keel_serve *s;
  keel_breaker *b;
  keel_queue *q;
  keel_retry *r;
  int port;
} fixture;

static void process_ok(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q, (void)payload, (void)data;
  keel_job_done(job, 0);
}

static void retry_attempt(keel_retry *r, unsigned n, void *data) {
  (void)n, (void)data;
  keel_retry_report(r, UV_ECONNRESET);
}

static void retry_done(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)r, (void)status, (void)attempts, (void)data;
}

static void trip(keel_breaker *b, int n) {
  for (int i = 0; i < n; i++) {
    keel_breaker_permit p;
    if (keel_breaker_acquire(b, &p) == 0) keel_breaker_release(&p, UV_ECONNRESET, 1);
  }
}

static void setup_fixture(fixture *f, const char *token) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.port = 0;
  o.token = token;
  o.ws_interval_ms = 20;
  o.max_clients = 2000;
  cr_assert_eq(keel_serve_new(&f->loop, &o, &f->s), 0);
  f->port = keel_serve_port(f->s);
  cr_assert_gt(f->port, 0);
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  cr_assert_eq(keel_breaker_new(&f->loop, &bo, &f->b), 0);
  keel_queue_opts qo;
  keel_queue_opts_init(&qo);
  cr_assert_eq(keel_queue_new(&f->loop, process_ok, &qo, &f->q), 0);
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  ro.max_attempts = 2;
  cr_assert_eq(keel_retry_start(&f->loop, &ro, retry_attempt, retry_done, NULL, &f->r), 0);
  cr_assert_eq(keel_breaker_serve(f->s, f->b, "pay\"ments\\\nx"), 0);
  cr_assert_eq(keel_queue_serve(f->s, f->q, "emails"), 0);
  cr_assert_eq(keel_retry_serve(f->s, f->r, "sync"), 0);
}

/* A fixture with a server only (no objects), made with o on a free port. */
static void setup_server_only(fixture *f, keel_serve_opts *o) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(uv_loop_init(&f->loop), 0);
  o->port = 0;
  cr_assert_eq(keel_serve_new(&f->loop, o, &f->s), 0);
}

static void teardown_fixture(fixture *f) {
  keel_serve_close(f->s, NULL, NULL);
  keel_breaker_close(f->b, NULL, NULL);
  keel_queue_close(f->q, NULL, NULL);
  keel_retry_close(f->r, NULL, NULL);
  kt_loop_finish(&f->loop);
}

/* ---- /metrics and /stats.json ---------------------------------------- */

typedef struct fetch {
  int port;
  const char *path;
  const char *headers;
  int status;
  char *reply;
} fetch;

static void do_fetch(void *arg) {
  fetch *x = arg;
  x->reply = tc_get(x->port, x->path, x->headers, &x->status);
}

static char *get(fixture *f, const char *path, const char *headers, int *status) {
  fetch x = {f->port, path, headers, 0, NULL};
  tc_run(&f->loop, do_fetch, &x);
  *status = x.status;
  cr_assert_not_null(x.reply);
  return x.reply;
}

Test(serve, metrics_text_format) {
  fixture f;
  setup_fixture(&f, NULL);
  trip(f.b, 5);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), KEEL_EOPEN);
  cr_assert_eq(keel_breaker_acquire(f.b, &p), KEEL_EOPEN);
  for (int i = 0; i < 3; i++) keel_queue_push(f.q, NULL, 0, NULL);
  uv_run(&f.loop, UV_RUN_NOWAIT);
  int st;
  char *r = get(&f, "/metrics", NULL, &st);
  cr_assert_eq(st, 200, "%s", r);
  cr_assert(strstr(r, "Content-Type: text/plain; version=0.0.4") ||
                strstr(r, "content-type: text/plain; version=0.0.4"),
            "%s", r);
  const char *body = tc_body(r);
  cr_assert(strstr(body, "# TYPE keel_build_info gauge\nkeel_build_info{version=\""));
  cr_assert(strstr(body, "# HELP keel_breaker_calls_rejected_total Calls rejected"), "%s", body);
  cr_assert(strstr(body, "# TYPE keel_breaker_calls_rejected_total counter\n"));
  /* the name label escaped: quote, backslash and newline */
  cr_assert(strstr(body, "keel_breaker_calls_rejected_total{name=\"pay\\\"ments\\\\\\nx\"} 2\n"),
            "%s", body);
  cr_assert(strstr(body, "keel_breaker_state{name=\"pay\\\"ments\\\\\\nx\",state=\"open\"} 1\n"));
  cr_assert(strstr(body, "keel_breaker_state{name=\"pay\\\"ments\\\\\\nx\",state=\"closed\"} 0\n"));
  cr_assert(strstr(body, "# TYPE keel_queue_run_seconds histogram\n"));
  cr_assert(strstr(body, "keel_queue_run_seconds_bucket{name=\"emails\",le=\"+Inf\"} 3\n"), "%s",
            body);
  cr_assert(strstr(body, "keel_queue_run_seconds_count{name=\"emails\"} 3\n"));
  cr_assert(strstr(body, "keel_queue_completed_total{name=\"emails\"} 3\n"));
  cr_assert(strstr(body, "keel_retry_attempts_total{name=\"sync\"}"));
  cr_assert(strstr(body, "keel_serve_requests_total{name=\"server\"}"));
  /* one HELP and one TYPE per family, even with two objects of a kind */
  const char *first = strstr(body, "# TYPE keel_queue_pending gauge");
  cr_assert_not_null(first);
  cr_assert_null(strstr(first + 1, "# TYPE keel_queue_pending gauge"));
  free(r);
  teardown_fixture(&f);
}

Test(serve, stats_json_fields) {
  fixture f;
  setup_fixture(&f, NULL);
  trip(f.b, 5);
  keel_breaker_permit p;
  cr_assert_eq(keel_breaker_acquire(f.b, &p), KEEL_EOPEN);
  int st;
  char *r = get(&f, "/stats.json", NULL, &st);
  cr_assert_eq(st, 200);
  json_error_t err;
  json_t *root = json_loads(tc_body(r), 0, &err);
  cr_assert_not_null(root, "%s: %s", err.text, tc_body(r));
  cr_assert_str_eq(json_string_value(json_object_get(root, "version")), keel_version_string());
  json_t *objs = json_object_get(root, "objects");
  cr_assert_eq(json_array_size(objs), 3);
  json_t *b = json_array_get(objs, 0);
  cr_assert_str_eq(json_string_value(json_object_get(b, "kind")), "breaker");
  cr_assert_str_eq(json_string_value(json_object_get(b, "name")), "pay\"ments\\\nx");
  json_t *bs = json_object_get(b, "stats");
  cr_assert_str_eq(json_string_value(json_object_get(bs, "state")), "open");
  cr_assert_eq(json_integer_value(json_object_get(bs, "calls_rejected")), 1);
  json_t *qs = json_object_get(json_array_get(objs, 1), "stats");
  cr_assert(json_is_object(json_object_get(qs, "wait_seconds")));
  cr_assert(json_is_integer(json_object_get(json_object_get(qs, "wait_seconds"), "count")));
  cr_assert(json_is_object(json_object_get(root, "server")));
  json_decref(root);
  free(r);
  teardown_fixture(&f);
}

/* ---- bad input ------------------------------------------------------- */

typedef struct raw {
  int port;
  const char *req;
  size_t len;
  int status;
  char *reply;
} raw;

static void do_raw(void *arg) {
  raw *x = arg;
  x->reply = tc_http_raw(x->port, x->req, x->len, &x->status);
}

static int raw_status(fixture *f, const char *req, size_t len) {
  raw x = {f->port, req, len, 0, NULL};
  tc_run(&f->loop, do_raw, &x);
  cr_assert_not_null(x.reply);
  free(x.reply);
  return x.status;
}

Test(serve, bad_requests) {
  fixture f;
  setup_fixture(&f, NULL);
  int st;
  free(get(&f, "/nope", NULL, &st));
  cr_assert_eq(st, 404);
  free(get(&f, "/ws", NULL, &st));
  cr_assert_eq(st, 400);
  const char *post =
      "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
  cr_assert_eq(raw_status(&f, post, strlen(post)), 405);
  const char *del = "DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  cr_assert_eq(raw_status(&f, del, strlen(del)), 405);
  /* oversized: a header far beyond max_request_bytes */
  size_t big = 20000;
  char *req = malloc(big + 200);
  int n = snprintf(req, 200, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ");
  memset(req + n, 'a', big);
  memcpy(req + n + big, "\r\nConnection: close\r\n\r\n", 24);
  int s1 = raw_status(&f, req, (size_t)n + big + 24);
  cr_assert_eq(s1, 400, "oversized got %d", s1);
  /* a head under max_request_bytes (4096) is served */
  n = snprintf(req, 200, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ");
  memset(req + n, 'a', 3000);
  memcpy(req + n + 3000, "\r\nConnection: close\r\n\r\n", 24);
  cr_assert_eq(raw_status(&f, req, (size_t)n + 3000 + 24), 200);
  free(req);
  /* malformed: every one gets exactly 400 (regression: libwebsockets 4.1
   * answered these 403 or closed without a word) */
#define R(lit) \
  { lit, sizeof lit - 1 }
  static const struct {
    const char *req;
    size_t len;
  } bad[] = {
      R("GARBAGE\r\n\r\n"),
      R("GET\r\n\r\n"),
      R("GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
      R("GET /metrics\r\nHost: x\r\n\r\n"),
      R("GET metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
      R("\x01\x02garbage garbage\r\n\r\n"),
      R("\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"), /* a TLS hello, no CRLF */
      R("\0\0\0\0GET / HTTP/1.1\r\n\r\n"),
      R("GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"),
      R("GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"),
      R("GET /metrics HTTP/1.1\nHost: x\n\n"),
      R("GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n"),
      R("GET /metrics HTTP/1.1\r\n\r\n"), /* HTTP/1.1 without Host */
      R("GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
      R("GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n"),
  };
#undef R
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    raw x = {f.port, bad[i].req, bad[i].len, 0, NULL};
    tc_run(&f.loop, do_raw, &x);
    cr_assert_not_null(x.reply);
    cr_assert_eq(x.status, 400, "request %zu got %d: %s", i, x.status, x.reply);
    cr_assert(strstr(x.reply, "HTTP/1.1 400 Bad Request\r\n") == x.reply, "%s", x.reply);
    cr_assert_not_null(strcasestr(x.reply, "connection: close"), "%s", x.reply);
    free(x.reply);
  }
  /* a head over 64 KiB (libwebsockets' own buffer) gets 400 too */
  size_t huge = 100000;
  req = malloc(huge + 200);
  n = snprintf(req, 200, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ");
  memset(req + n, 'a', huge);
  memcpy(req + n + huge, "\r\n\r\n", 4);
  int s4 = raw_status(&f, req, (size_t)n + huge + 4);
  cr_assert_eq(s4, 400, "over 64 KiB got %d", s4);
  free(req);
  /* the server still answers */
  free(get(&f, "/metrics", NULL, &st));
  cr_assert_eq(st, 200);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_geq(ss.responses_4xx, 21);
  teardown_fixture(&f);
}

/* Reads one answer (head and Content-Length body) from fd into buf;
 * returns its status, 0 when the connection closed first. */
static int read_answer(int fd, char *buf, size_t cap, size_t *used) {
  size_t len = *used;
  for (;;) {
    buf[len] = '\0';
    char *e = strstr(buf, "\r\n\r\n");
    if (e != NULL) {
      const char *cl = strcasestr(buf, "content-length:");
      size_t hl = (size_t)(e + 4 - buf), want = cl ? strtoul(cl + 15, NULL, 10) : 0;
      if (len >= hl + want) {
        int st = atoi(buf + 9);
        memmove(buf, buf + hl + want, len - hl - want); /* the next answer's bytes */
        *used = len - hl - want;
        return st;
      }
    }
    if (len + 1 >= cap) return 0;
    ssize_t m = recv(fd, buf + len, cap - len - 1, 0);
    if (m <= 0) return 0;
    len += (size_t)m;
  }
}

typedef struct keepalive {
  int port;
  int st[6];
  bool closed_after;
} keepalive;

static void do_keepalive(void *arg) {
  keepalive *k = arg;
  int fd = tc_connect(k->port);
  if (fd < 0) return;
  static char buf[1 << 21];
  size_t used = 0;
  const char *get1 = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  tc_send_all(fd, get1, strlen(get1));
  k->st[0] = read_answer(fd, buf, sizeof buf, &used);
  /* two pipelined requests in one write, then one more */
  const char *two =
      "GET /stats.json HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n";
  tc_send_all(fd, two, strlen(two));
  k->st[1] = read_answer(fd, buf, sizeof buf, &used);
  k->st[2] = read_answer(fd, buf, sizeof buf, &used);
  tc_send_all(fd, "\r\n", 2); /* an empty line between requests is allowed */
  tc_send_all(fd, get1, strlen(get1));
  k->st[3] = read_answer(fd, buf, sizeof buf, &used);
  /* a malformed request on the same connection: 400, then closed */
  tc_send_all(fd, "GARBAGE\r\n\r\n", 11);
  k->st[4] = read_answer(fd, buf, sizeof buf, &used);
  char c;
  k->closed_after = used == 0 && recv(fd, &c, 1, 0) == 0;
  close(fd);
}

Test(serve, keep_alive_pipelining_and_malformed_second_request) {
  fixture f;
  setup_fixture(&f, NULL);
  keepalive k = {f.port, {0}, false};
  tc_run(&f.loop, do_keepalive, &k);
  cr_assert_eq(k.st[0], 200);
  cr_assert_eq(k.st[1], 200);
  cr_assert_eq(k.st[2], 404);
  cr_assert_eq(k.st[3], 200);
  /* regression: a later request on a kept connection was parsed by
   * libwebsockets, which answered 403 */
  cr_assert_eq(k.st[4], 400);
  cr_assert(k.closed_after);
  int st;
  free(get(&f, "/metrics", NULL, &st));
  cr_assert_eq(st, 200);
  teardown_fixture(&f);
}

/* Sends s one byte per write, a little apart, so that the server reads
 * the head in pieces. */
static void send_dripped(int fd, const char *s) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  for (; *s; s++) {
    tc_send_all(fd, s, 1);
    usleep(200);
  }
}

typedef struct drip {
  int port;
  int st[4];
} drip;

static void do_drip(void *arg) {
  drip *d = arg;
  int fd = tc_connect(d->port);
  if (fd < 0) return;
  static char buf[1 << 21];
  size_t used = 0;
  /* an empty line whose CR and LF come apart, then the request */
  send_dripped(fd, "\r");
  usleep(50000);
  send_dripped(fd, "\nGET /stats.json?x=%41 HTTP/1.1\r\nHost: x\r\n\r\n");
  d->st[0] = read_answer(fd, buf, sizeof buf, &used);
  /* the next head on the kept connection is read from its own start */
  send_dripped(fd, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
  d->st[1] = read_answer(fd, buf, sizeof buf, &used);
  /* junk is answered once its first bytes show it, not at the timeout */
  send_dripped(fd, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET x");
  d->st[2] = read_answer(fd, buf, sizeof buf, &used);
  d->st[3] = read_answer(fd, buf, sizeof buf, &used);
  close(fd);
}

Test(serve, head_read_one_byte_at_a_time) {
  fixture f;
  setup_fixture(&f, NULL);
  drip d = {f.port, {0}};
  tc_run(&f.loop, do_drip, &d);
  cr_assert_eq(d.st[0], 200);
  cr_assert_eq(d.st[1], 404);
  cr_assert_eq(d.st[2], 404);
  cr_assert_eq(d.st[3], 400);
  teardown_fixture(&f);
}

typedef struct slow {
  int port;
  int status;
  double waited_s;
} slow;

static void do_slow(void *arg) {
  slow *x = arg;
  int fd = tc_connect(x->port);
  if (fd < 0) return;
  uint64_t t0 = uv_hrtime();
  const char *part = "GET /metrics HTTP/1.1\r\nHo";
  tc_send_all(fd, part, strlen(part)); /* and nothing more */
  char buf[256];
  ssize_t m = recv(fd, buf, sizeof buf - 1, 0);
  x->status = m > 0 ? -1 : 0; /* closed without an answer */
  x->waited_s = (double)(uv_hrtime() - t0) / 1e9;
  close(fd);
}

Test(serve, incomplete_request_closed_after_timeout) {
  fixture f;
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.request_timeout_s = 1;
  setup_server_only(&f, &o);
  slow x = {keel_serve_port(f.s), 1, 0};
  tc_run(&f.loop, do_slow, &x);
  cr_assert_eq(x.status, 0);
  cr_assert_geq(x.waited_s, 0.9); /* not before the timeout (the client's own is 10 s) */
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.clients, 0);
  keel_serve_close(f.s, NULL, NULL);
  kt_loop_finish(&f.loop);
}

/* ---- an HTTP client that never reads ---------------------------------- */

static char wide_names[2000][8];

static void write_wide(const void *obj, keel_stats_writer *w) {
  (void)obj;
  for (int i = 0; i < 2000; i++) keel_stats_gauge(w, wide_names[i], "One of many.", i);
}

typedef struct stuck {
  int port;
  int fd;
} stuck;

static void do_stuck(void *arg) {
  stuck *x = arg;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int small = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)x->port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return;
  }
  /* 100 pipelined scrapes of about 150 KB each, never read */
  char req[4000];
  size_t n = 0;
  for (int i = 0; i < 100; i++)
    n += (size_t)snprintf(req + n, sizeof req - n, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  tc_send_all(fd, req, n);
  x->fd = fd;
}

static void do_ok(void *arg) {
  fetch *x = arg;
  x->reply = tc_get(x->port, x->path, NULL, &x->status);
}

Test(serve, metrics_client_that_never_reads) {
  fixture f;
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.request_timeout_s = 1;
  setup_server_only(&f, &o);
  for (int i = 0; i < 2000; i++) snprintf(wide_names[i], sizeof wide_names[i], "g%d", i);
  static const keel_stats_source wide = {"wide", write_wide};
  int obj = 0;
  cr_assert_eq(keel_serve_register(f.s, &wide, &obj, "w", NULL), 0);
  stuck x = {keel_serve_port(f.s), -1};
  tc_run(&f.loop, do_stuck, &x);
  cr_assert_geq(x.fd, 0);
  /* the loop keeps serving others while that answer is stuck */
  fetch g = {x.port, "/stats.json", NULL, 0, NULL};
  tc_run(&f.loop, do_ok, &g);
  cr_assert_eq(g.status, 200);
  free(g.reply);
  /* and the stuck connection is closed once its answer's deadline passed */
  keel_serve_stats ss;
  uint64_t t0 = uv_hrtime();
  do {
    uv_run(&f.loop, UV_RUN_ONCE);
    keel_serve_get_stats(f.s, &ss);
  } while (ss.clients > 0 && uv_hrtime() - t0 < 10000000000ull);
  cr_assert_eq(ss.clients, 0);
  cr_assert_lt(ss.requests, 100); /* it did not get them all */
  close(x.fd);
  keel_serve_close(f.s, NULL, NULL);
  kt_loop_finish(&f.loop);
}

Test(serve, bearer_token) {
  fixture f;
  setup_fixture(&f, "s3cret");
  int st;
  free(get(&f, "/metrics", NULL, &st));
  cr_assert_eq(st, 401);
  free(get(&f, "/metrics", "Authorization: Bearer wrong\r\n", &st));
  cr_assert_eq(st, 401);
  free(get(&f, "/metrics", "Authorization: Bearer s3cre\r\n", &st));
  cr_assert_eq(st, 401);
  free(get(&f, "/metrics", "Authorization: Bearer s3cret\r\n", &st));
  cr_assert_eq(st, 200);
  free(get(&f, "/stats.json?token=s3cret", NULL, &st));
  cr_assert_eq(st, 200);
  free(get(&f, "/?token=nope", NULL, &st));
  cr_assert_eq(st, 401);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.unauthorized, 4);
  teardown_fixture(&f);
}

typedef struct many {
  int port;
  int dropped;
} many;

static void do_many(void *arg) {
  many *m = arg;
  for (int i = 0; i < 1000; i++) {
    int fd = tc_connect(m->port);
    if (fd < 0) continue;
    static const char part[] = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Half: ";
    if (i % 3 != 0) tc_send_all(fd, part, sizeof part - 1 - (size_t)(i % 20));
    if (i % 2 == 0) {
      struct linger l = {1, 0}; /* RST */
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    close(fd);
    m->dropped++;
  }
}

Test(serve, thousand_connections_dropped_mid_request) {
  fixture f;
  setup_fixture(&f, NULL);
  many m = {f.port, 0};
  tc_run(&f.loop, do_many, &m);
  cr_assert_eq(m.dropped, 1000);
  int st;
  free(get(&f, "/metrics", NULL, &st));
  cr_assert_eq(st, 200);
  /* every dropped connection is gone: only ours was counted */
  for (int i = 0; i < 200; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_leq(ss.clients, 1, "clients %u", ss.clients);
  teardown_fixture(&f);
}

/* ---- WebSocket ------------------------------------------------------- */

typedef struct wsx {
  fixture *f;
  int fd;
  int status;
  char *first;
  const char *path;
} wsx;

static void do_ws_open(void *arg) {
  wsx *x = arg;
  x->fd = tc_ws_open(x->f->port, x->path ? x->path : "/ws", &x->status);
  if (x->fd >= 0) x->first = tc_ws_read(x->fd, NULL);
}

typedef struct wsread {
  int fd;
  const char *want;
  int frames;
  bool found;
} wsread;

static void do_ws_until(void *arg) {
  wsread *x = arg;
  for (int i = 0; i < 200 && !x->found; i++) {
    char *m = tc_ws_read(x->fd, NULL);
    if (m == NULL) return;
    x->frames++;
    if (strstr(m, x->want)) x->found = true;
    free(m);
  }
}

typedef struct tripper {
  keel_breaker *b;
  uv_timer_t t;
} tripper;

static void on_trip(uv_timer_t *t) {
  tripper *tr = t->data;
  keel_breaker_force_open(tr->b);
  uv_close((uv_handle_t *)t, NULL);
}

Test(serve, websocket_snapshot_then_deltas) {
  fixture f;
  setup_fixture(&f, NULL);
  wsx x = {&f, -1, 0, NULL, NULL};
  tc_run(&f.loop, do_ws_open, &x);
  cr_assert_eq(x.status, 101);
  cr_assert_not_null(x.first);
  json_t *snap = json_loads(x.first, 0, NULL);
  cr_assert_not_null(snap, "%s", x.first);
  cr_assert_str_eq(json_string_value(json_object_get(snap, "type")), "snapshot");
  cr_assert_eq(json_array_size(json_object_get(snap, "objects")), 3);
  cr_assert(strstr(x.first, "\"state\":\"closed\""));
  json_decref(snap);
  free(x.first);
  /* the breaker changes after the snapshot: a delta carries it */
  tripper tr = {f.b, {0}};
  uv_timer_init(&f.loop, &tr.t);
  tr.t.data = &tr;
  uv_timer_start(&tr.t, on_trip, 50, 0);
  wsread rd = {x.fd, "\"state\":\"forced_open\"", 0, false};
  tc_run(&f.loop, do_ws_until, &rd);
  cr_assert(rd.found);
  /* an object closed while a client watches is reported removed */
  keel_queue_close(f.q, NULL, NULL);
  f.q = NULL;
  wsread rd2 = {x.fd, "\"removed\":[2]", 0, false};
  tc_run(&f.loop, do_ws_until, &rd2);
  cr_assert(rd2.found);
  close(x.fd);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.frames_dropped, 0);
  cr_assert_eq(ss.ws_accepted, 1);
  teardown_fixture(&f);
}

Test(serve, websocket_refused_on_other_path_or_token) {
  fixture f;
  setup_fixture(&f, "tok");
  wsx x = {&f, -1, 0, NULL, "/ws"};
  tc_run(&f.loop, do_ws_open, &x);
  cr_assert_eq(x.status, 401);
  wsx w = {&f, -1, 0, NULL, "/ws?token=wrong"};
  tc_run(&f.loop, do_ws_open, &w);
  cr_assert_eq(w.status, 401);
  wsx y = {&f, -1, 0, NULL, "/elsewhere?token=tok"};
  tc_run(&f.loop, do_ws_open, &y);
  cr_assert_eq(y.status, 404);
  wsx z = {&f, -1, 0, NULL, "/ws?token=tok"};
  tc_run(&f.loop, do_ws_open, &z);
  cr_assert_eq(z.status, 101);
  free(z.first);
  close(z.fd);
  teardown_fixture(&f);
}

Test(serve, websocket_with_largest_max_request_bytes) {
  /* regression: lws's header buffer was max_request_bytes + 64 as an
   * unsigned short, 63 bytes for 65535: no handshake fit */
  fixture f;
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.max_request_bytes = 65535;
  setup_server_only(&f, &o);
  f.port = keel_serve_port(f.s);
  wsx x = {&f, -1, 0, NULL, "/ws"};
  tc_run(&f.loop, do_ws_open, &x);
  cr_assert_eq(x.status, 101);
  cr_assert_not_null(x.first);
  free(x.first);
  close(x.fd);
  keel_serve_close(f.s, NULL, NULL);
  kt_loop_finish(&f.loop);
}

typedef struct idle {
  uv_timer_t t;
  int n;
  keel_breaker *b;
} idle;

static void on_churn(uv_timer_t *t) {
  idle *d = t->data;
  trip(d->b, 1); /* every tick has a change to send */
  keel_breaker_reset(d->b);
  if (++d->n == 150) uv_close((uv_handle_t *)t, NULL);
}

Test(serve, websocket_client_that_never_reads) {
  fixture f;
  setup_fixture(&f, NULL);
  /* many objects so that frames are large and the socket buffers fill */
  keel_breaker *extra[300];
  for (int i = 0; i < 300; i++) {
    keel_breaker_opts bo;
    keel_breaker_opts_init(&bo);
    cr_assert_eq(keel_breaker_new(&f.loop, &bo, &extra[i]), 0);
    char name[64];
    snprintf(name, sizeof name, "a-rather-long-breaker-name-to-make-frames-big-%03d", i);
    cr_assert_eq(keel_breaker_serve(f.s, extra[i], name), 0);
  }
  int st;
  wsx x = {&f, -1, 0, NULL, "/ws"};
  tc_run(&f.loop, do_ws_open, &x); /* reads the snapshot, then never again */
  cr_assert_eq(x.status, 101);
  free(x.first);
  int fd = x.fd;
  /* never read fd; the loop churns and sends deltas every 20 ms */
  idle d = {{0}, 0, extra[0]};
  uv_timer_init(&f.loop, &d.t);
  d.t.data = &d;
  uv_timer_start(&d.t, on_churn, 5, 5);
  while (uv_is_active((uv_handle_t *)&d.t)) uv_run(&f.loop, UV_RUN_ONCE);
  /* the loop kept serving */
  free(get(&f, "/metrics", NULL, &st));
  cr_assert_eq(st, 200);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.ws_clients, 1);
  cr_assert_gt(ss.frames_sent, 0);
  if (fd >= 0) close(fd);
  for (int i = 0; i < 300; i++) keel_breaker_close(extra[i], NULL, NULL);
  teardown_fixture(&f);
}

/* ---- registration order ---------------------------------------------- */

static int closed_count;
static void count_close(void *obj, void *data) {
  (void)obj, (void)data;
  closed_count++;
}

Test(serve, object_closed_before_server) {
  fixture f;
  setup_fixture(&f, NULL);
  keel_breaker_close(f.b, NULL, NULL);
  f.b = NULL;
  char *text;
  cr_assert_eq(keel_serve_metrics_text(f.s, &text, NULL), 0);
  cr_assert_null(strstr(text, "keel_breaker_state{"));
  cr_assert_not_null(strstr(text, "keel_queue_pending{"));
  keel_free(text);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.registered, 2);
  closed_count = 0;
  keel_serve_close(f.s, count_close, NULL);
  keel_serve_close(f.s, count_close, NULL); /* second call: nothing */
  cr_assert_eq(closed_count, 0);            /* never inside the call */
  f.s = NULL;
  keel_queue_close(f.q, NULL, NULL);
  keel_retry_close(f.r, NULL, NULL);
  kt_loop_finish(&f.loop);
  cr_assert_eq(closed_count, 1);
}

Test(serve, server_closed_before_objects) {
  fixture f;
  setup_fixture(&f, NULL);
  closed_count = 0;
  keel_serve_close(f.s, count_close, NULL);
  cr_assert_eq(keel_breaker_serve(f.s, f.b, "again"), KEEL_ECLOSING);
  for (int i = 0; i < 50 && closed_count == 0; i++) uv_run(&f.loop, UV_RUN_ONCE);
  cr_assert_eq(closed_count, 1);
  /* the objects live on and close later without touching the server */
  keel_breaker_close(f.b, NULL, NULL);
  keel_queue_close(f.q, NULL, NULL);
  keel_retry_close(f.r, NULL, NULL);
  kt_loop_finish(&f.loop);
}

Test(serve, register_refusals) {
  fixture f;
  setup_fixture(&f, NULL);
  cr_assert_eq(keel_breaker_serve(f.s, f.b, "pay\"ments\\\nx"), KEEL_ECONFLICT);
  cr_assert_eq(keel_breaker_serve(f.s, f.b, ""), UV_EINVAL);
  cr_assert_eq(keel_breaker_serve(f.s, f.b, "\xff\xfe"), UV_EINVAL);
  cr_assert_eq(keel_breaker_serve(NULL, f.b, "x"), UV_EINVAL);
  static const keel_stats_source bad = {"Bad-Kind", NULL};
  cr_assert_eq(keel_serve_register(f.s, &bad, f.b, "x", NULL), UV_EINVAL);
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.ws_interval_ms = 1;
  keel_serve *s2 = NULL;
  cr_assert_eq(keel_serve_new(&f.loop, &o, &s2), UV_EINVAL);
  cr_assert_null(s2);
  keel_serve_opts_init(&o);
  o.host = "localhost"; /* an IPv4 address only */
  cr_assert_eq(keel_serve_new(&f.loop, &o, &s2), UV_EINVAL);
  cr_assert_null(s2);
  /* the same port twice */
  keel_serve_opts_init(&o);
  o.port = f.port;
  cr_assert_eq(keel_serve_new(&f.loop, &o, &s2), UV_EADDRINUSE);
  cr_assert_null(s2);
  teardown_fixture(&f);
}

/* Regression: the queue, retry, listener and pool adapters took an object
 * whose close had begun; its registration outlived it, and the next render
 * read freed memory. */
Test(serve, adapters_refuse_objects_whose_close_began) {
  fixture f;
  setup_fixture(&f, NULL);
  keel_queue_opts qo;
  keel_queue_opts_init(&qo);
  keel_queue *q;
  cr_assert_eq(keel_queue_new(&f.loop, process_ok, &qo, &q), 0);
  keel_retry_opts ro;
  keel_retry_opts_init(&ro);
  keel_retry *r;
  cr_assert_eq(keel_retry_start(&f.loop, &ro, retry_attempt, retry_done, NULL, &r), 0);
  keel_listener_opts lo;
  keel_listener_opts_init(&lo);
  lo.conninfo = "host=127.0.0.1 port=1";
  lo.table = "t";
  keel_listener *l;
  cr_assert_eq(keel_listener_new(&f.loop, &lo, &l), 0);
  keel_pg_pool_opts po;
  keel_pg_pool_opts_init(&po);
  po.conn.conninfo = "host=127.0.0.1 port=1";
  keel_pg_pool *p;
  cr_assert_eq(keel_pg_pool_new(&f.loop, &po, &p), 0);
  keel_queue_close(q, NULL, NULL);
  keel_retry_close(r, NULL, NULL);
  keel_listener_close(l, NULL, NULL);
  keel_pg_pool_close(p, NULL, NULL);
  cr_assert_eq(keel_queue_serve(f.s, q, "q"), KEEL_ECLOSING);
  cr_assert_eq(keel_retry_serve(f.s, r, "r"), KEEL_ECLOSING);
  cr_assert_eq(keel_listener_serve(f.s, l, "l"), KEEL_ECLOSING);
  cr_assert_eq(keel_pg_pool_serve(f.s, p, "p"), KEEL_ECLOSING);
  /* the objects are freed by now; a render reads none of them */
  for (int i = 0; i < 20; i++) uv_run(&f.loop, UV_RUN_NOWAIT);
  char *text;
  size_t len;
  cr_assert_eq(keel_serve_metrics_text(f.s, &text, &len), 0);
  cr_assert_null(strstr(text, "name=\"l\""));
  keel_free(text);
  teardown_fixture(&f);
}

/* A source that writes its metric names and help texts into buffers it
 * reuses and frees (regression: every sample went to the first family,
 * and the HELP text was read after the source freed it). */
static void write_reused(const void *obj, keel_stats_writer *w) {
  (void)obj;
  char metric[16];
  for (int i = 0; i < 3; i++) {
    snprintf(metric, sizeof metric, "metric%d", i);
    char *help = malloc(32);
    snprintf(help, 32, "help of %d", i);
    keel_stats_gauge(w, metric, help, i + 1);
    memset(help, 'x', 31);
    free(help);
  }
}

Test(serve, source_names_in_reused_buffers) {
  fixture f;
  setup_fixture(&f, NULL);
  static const keel_stats_source reused = {"reused", write_reused};
  int obj;
  cr_assert_eq(keel_serve_register(f.s, &reused, &obj, "one", NULL), 0);
  cr_assert_eq(keel_serve_register(f.s, &reused, &obj, "two", NULL), 0);
  for (int render = 0; render < 2; render++) {
    char *text;
    size_t len;
    cr_assert_eq(keel_serve_metrics_text(f.s, &text, &len), 0);
    for (int i = 0; i < 3; i++) {
      char want[96];
      snprintf(want, sizeof want, "# HELP keel_reused_metric%d help of %d\n", i, i);
      cr_assert_not_null(strstr(text, want), "%s", text);
      snprintf(want, sizeof want, "keel_reused_metric%d{name=\"two\"} %d\n", i, i + 1);
      cr_assert_not_null(strstr(text, want), "%s", text);
    }
    keel_free(text);
  }
  teardown_fixture(&f);
}

/* ---- custom source and unregister ------------------------------------ */

static void write_custom(const void *obj, keel_stats_writer *w) {
  const int *v = obj;
  keel_stats_gauge(w, "level_bytes", "A custom gauge.", *v);
  keel_stats_text(w, "note", "hi");
}

Test(serve, custom_source_and_unregister) {
  fixture f;
  setup_fixture(&f, NULL);
  static const keel_stats_source src = {"custom", write_custom};
  int v = 42;
  keel_stats_reg *reg;
  cr_assert_eq(keel_serve_register(f.s, &src, &v, "c1", &reg), 0);
  char *text;
  cr_assert_eq(keel_serve_metrics_text(f.s, &text, NULL), 0);
  cr_assert_not_null(strstr(text, "keel_custom_level_bytes{name=\"c1\"} 42\n"));
  keel_free(text);
  cr_assert_eq(keel_serve_stats_json(f.s, &text, NULL), 0);
  cr_assert_not_null(strstr(text, "\"note\":\"hi\""));
  keel_free(text);
  keel_serve_unregister(reg);
  cr_assert_eq(keel_serve_metrics_text(f.s, &text, NULL), 0);
  cr_assert_null(strstr(text, "keel_custom_level_bytes{"));
  keel_free(text);
  teardown_fixture(&f);
}

/* ---- allocation failure ---------------------------------------------- */

static void failmalloc_scenario(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_serve_opts o;
  keel_serve_opts_init(&o);
  o.port = 0;
  o.token = "t";
  keel_serve *s = NULL;
  keel_breaker *b = NULL;
  keel_breaker_opts bo;
  keel_breaker_opts_init(&bo);
  int rc = keel_serve_new(&loop, &o, &s);
  cr_assert(rc == 0 || rc == UV_ENOMEM, "%d", rc);
  if (keel_breaker_new(&loop, &bo, &b) != 0) b = NULL;
  if (s != NULL && b != NULL) {
    rc = keel_breaker_serve(s, b, "b");
    cr_assert(rc == 0 || rc == UV_ENOMEM);
    char *text = NULL;
    rc = keel_serve_metrics_text(s, &text, NULL);
    cr_assert(rc == 0 || rc == UV_ENOMEM);
    keel_free(text);
    text = NULL;
    rc = keel_serve_stats_json(s, &text, NULL);
    cr_assert(rc == 0 || rc == UV_ENOMEM);
    keel_free(text);
  }
  if (kt_failmalloc_index() % 2 == 0) {
    keel_breaker_close(b, NULL, NULL);
    keel_serve_close(s, NULL, NULL);
  } else {
    keel_serve_close(s, NULL, NULL);
    keel_breaker_close(b, NULL, NULL);
  }
  kt_loop_finish(&loop);
}

Test(serve, allocation_failure) {
  kt_failmalloc_run(failmalloc_scenario, NULL);
}

/* ---- adapters of the Redis, durable-queue, policy and idempotency modules */

/* promtool check metrics on text when promtool is installed: its exit
 * status, or 0 without it. */
static int promtool_check(const char *text, size_t len) {
  if (system("command -v promtool >/dev/null 2>&1") != 0) {
    cr_log_warn("promtool not installed: format not checked by it");
    return 0;
  }
  char path[] = "/tmp/keel-serve-metrics-XXXXXX";
  int fd = mkstemp(path);
  cr_assert_geq(fd, 0);
  cr_assert_eq(write(fd, text, len), (ssize_t)len);
  close(fd);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
  int rc = system(cmd);
  unlink(path);
  return rc;
}

Test(serve, adapters_redis_pgqueue_policy_idempotency) {
  fixture f;
  setup_fixture(&f, NULL);
  /* Nothing listens on port 1: the clients stay down, their stats exist. */
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = "redis://127.0.0.1:1";
  keel_redis *redis;
  cr_assert_eq(keel_redis_new(&f.loop, &ro, &redis), 0);
  keel_pgqueue_opts qo;
  keel_pgqueue_opts_init(&qo);
  qo.conninfo = "host=127.0.0.1 port=1 connect_timeout=1";
  keel_pgqueue *pq;
  cr_assert_eq(keel_pgqueue_new(&f.loop, &qo, &pq), 0);
  keel_pipeline_opts po;
  keel_pipeline_opts_init(&po);
  keel_pipeline *pipe;
  cr_assert_eq(keel_pipeline_new(&f.loop, &po, &pipe), 0);
  keel_ratelimit_opts lo;
  keel_ratelimit_opts_init(&lo);
  keel_ratelimit *rl;
  cr_assert_eq(keel_ratelimit_new(&f.loop, &lo, &rl), 0);
  keel_ratelimit_redis_opts rlo;
  keel_ratelimit_redis_opts_init(&rlo);
  keel_ratelimit_redis *rlr;
  cr_assert_eq(keel_ratelimit_redis_new(redis, &rlo, &rlr), 0);
  keel_idem_opts io;
  keel_idem_opts_init(&io);
  keel_idem *idem;
  cr_assert_eq(keel_idem_new_redis(&f.loop, redis, &io, &idem), 0);

  cr_assert_eq(keel_redis_serve(f.s, redis, "cache"), 0);
  cr_assert_eq(keel_pgqueue_serve(f.s, pq, "jobs"), 0);
  cr_assert_eq(keel_pipeline_serve(f.s, pipe, "api"), 0);
  cr_assert_eq(keel_ratelimit_serve(f.s, rl, "api"), 0);
  cr_assert_eq(keel_ratelimit_redis_serve(f.s, rlr, "tenants"), 0);
  cr_assert_eq(keel_idem_serve(f.s, idem, "payments"), 0);
  cr_assert_eq(keel_redis_serve(f.s, redis, "cache"), KEEL_ECONFLICT);
  cr_assert_eq(keel_redis_serve(NULL, redis, "cache"), UV_EINVAL);
  keel_ratelimit_stats rs;
  keel_ratelimit_get_stats(rl, &rs);

  char *text;
  size_t len;
  cr_assert_eq(keel_serve_metrics_text(f.s, &text, &len), 0);
  const char *want[] = {
      "# TYPE keel_redis_state gauge\n",
      "keel_redis_commands_total{name=\"cache\"} 0\n",
      "# TYPE keel_redis_latency_p99_seconds gauge\n",
      "keel_pgqueue_available{name=\"jobs\"} 0\n",
      "keel_pgqueue_enqueued_total{name=\"jobs\"} 0\n",
      "keel_pgqueue_pickup_p99_seconds{name=\"jobs\"} 0\n",
      "keel_pipeline_calls_total{name=\"api\"} 0\n",
      "keel_pipeline_bulkhead_queued_max{name=\"api\"} 0\n",
      "keel_ratelimit_allowed_total{name=\"api\"} 0\n",
      "# TYPE keel_ratelimit_available gauge\n",
      "keel_ratelimit_redis_errors_total{name=\"tenants\"} 0\n",
      "keel_ratelimit_redis_in_flight{name=\"tenants\"} 0\n",
      "keel_idempotency_begins_total{name=\"payments\"} 0\n",
      "keel_idempotency_in_flight{name=\"payments\"} 0\n",
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
    cr_assert_not_null(strstr(text, want[i]), "missing %s", want[i]);
  char line[128];
  snprintf(line, sizeof line, "keel_ratelimit_available{name=\"api\"} %llu\n",
           (unsigned long long)rs.available);
  cr_assert_not_null(strstr(text, line), "%s", line);
  cr_assert_eq(promtool_check(text, len), 0);
  keel_free(text);

  cr_assert_eq(keel_serve_stats_json(f.s, &text, NULL), 0);
  json_t *root = json_loads(text, 0, NULL);
  cr_assert_not_null(root, "%s", text);
  json_t *objs = json_object_get(root, "objects");
  const char *kinds[] = {"redis",     "pgqueue",         "pipeline",
                         "ratelimit", "ratelimit_redis", "idempotency"};
  const char *keys[] = {"state",     "flushes",   "bulkhead_rejected",
                        "available", "in_flight", "taken_over"};
  for (size_t k = 0; k < 6; k++) {
    bool found = false;
    for (size_t i = 0; i < json_array_size(objs); i++) {
      json_t *o = json_array_get(objs, i);
      if (strcmp(json_string_value(json_object_get(o, "kind")), kinds[k]) != 0) continue;
      found = true;
      cr_assert_not_null(json_object_get(json_object_get(o, "stats"), keys[k]), "%s.%s", kinds[k],
                         keys[k]);
    }
    cr_assert(found, "%s", kinds[k]);
  }
  json_decref(root);
  keel_free(text);

  /* their close drops them from the server */
  keel_idem_close(idem, NULL, NULL);
  keel_ratelimit_redis_close(rlr, NULL, NULL);
  keel_ratelimit_close(rl, NULL, NULL);
  keel_pipeline_close(pipe, NULL, NULL);
  keel_pgqueue_close(pq, NULL, NULL);
  /* a closing object is not registered again (its close already detached) */
  cr_assert_eq(keel_pipeline_serve(f.s, pipe, "api"), KEEL_ECLOSING);
  cr_assert_eq(keel_idem_serve(f.s, idem, "payments"), KEEL_ECLOSING);
  cr_assert_eq(keel_pgqueue_serve(f.s, pq, "jobs"), KEEL_ECLOSING);
  keel_serve_stats ss;
  keel_serve_get_stats(f.s, &ss);
  cr_assert_eq(ss.registered, 4); /* the fixture's three and the Redis client */
  /* and the server closed first forgets the rest */
  keel_serve_close(f.s, NULL, NULL);
  keel_redis_close(redis, NULL, NULL);
  f.s = NULL;
  teardown_fixture(&f);
}
