/*
 * bench/serve.c — keel_serve on a busy loop.
 *
 * 1,000 registered objects (400 breakers, 300 queues with latency
 * histograms, 200 retry runners, 100 custom sources), a churn timer that
 * changes a tenth of the breakers, queues and custom sources every 10 ms
 * (all 800 of them in every 100 ms delta), and:
 *   1. base: a 1 ms repeating uv timer's lateness with no server;
 *   2. /metrics: 1,000 scrapes over one keep-alive connection from a client
 *      thread: p99 latency and the text's size;
 *   3. the same 1 ms timer while 100 WebSocket clients (one thread, poll())
 *      receive deltas every 100 ms; clients count sequence gaps (lost
 *      frames) and the server counts frames it dropped. Large frames come
 *      in fragments (continuation frames): a message counts once.
 * Last line: serve scrape_p99_us=... metrics_bytes=... ws_clients=...
 * lateness_p99_us=... base_lateness_p99_us=... lost_frames=...
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common.h"
#include "keel.h"

#define N_BREAKERS 400
#define N_QUEUES 300
#define N_RETRIES 200
#define N_CUSTOM 100
#define N_SCRAPES 1000
#define N_WS 100
#define PHASE_MS 3000

static uv_loop_t loop;
static keel_breaker *breakers[N_BREAKERS];
static keel_queue *queues[N_QUEUES];
static keel_retry *retries[N_RETRIES];
static uint64_t custom_values[N_CUSTOM];
static unsigned churn_round;

/* ---- objects ---------------------------------------------------------- */

static void process(keel_queue *q, keel_job *job, void *payload, void *data) {
  (void)q, (void)payload, (void)data;
  keel_job_done(job, 0);
}
static void never_attempt(keel_retry *r, unsigned n, void *data) {
  (void)r, (void)n, (void)data; /* the attempt stays in flight: the runner lives on */
}
static void retry_done(keel_retry *r, int status, unsigned attempts, void *data) {
  (void)r, (void)status, (void)attempts, (void)data;
}
static void write_custom(const void *obj, keel_stats_writer *w) {
  const uint64_t *v = obj;
  keel_stats_counter(w, "events", "Events seen.", *v);
  keel_stats_gauge(w, "level_bytes", "A level.", (double)(*v % 1000));
}
static const keel_stats_source custom_source = {"custom", write_custom};

static void on_churn(uv_timer_t *t) {
  (void)t;
  churn_round++;
  for (unsigned i = churn_round % 10; i < N_BREAKERS; i += 10) {
    keel_breaker_permit p;
    if (keel_breaker_acquire(breakers[i], &p) == 0) keel_breaker_release(&p, 0, 1);
  }
  for (unsigned i = churn_round % 10; i < N_QUEUES; i += 10)
    keel_queue_push(queues[i], NULL, 0, NULL);
  for (unsigned i = churn_round % 10; i < N_CUSTOM; i += 10) custom_values[i]++;
}

/* ---- the 1 ms timer ----------------------------------------------------- */

typedef struct lateness {
  uv_timer_t timer;
  uint64_t last_ns;
  uint64_t *samples;
  int n, cap;
} lateness;

static void on_tick(uv_timer_t *t) {
  lateness *l = (lateness *)t;
  uint64_t now = uv_hrtime();
  if (l->last_ns != 0 && l->n < l->cap) {
    uint64_t gap = now - l->last_ns;
    l->samples[l->n++] = gap > 1000000 ? gap - 1000000 : 0;
  }
  l->last_ns = now;
}

static double measure_lateness(uint64_t ms) {
  lateness l;
  memset(&l, 0, sizeof l);
  l.cap = (int)ms * 2;
  l.samples = calloc((size_t)l.cap, sizeof *l.samples);
  uv_timer_init(&loop, &l.timer);
  uv_timer_start(&l.timer, on_tick, 1, 1);
  uint64_t end = uv_hrtime() + ms * 1000000ull;
  while (uv_hrtime() < end) uv_run(&loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&l.timer, NULL);
  uv_run(&loop, UV_RUN_NOWAIT);
  double p50, p99;
  bench_percentiles_us(l.samples, l.n, &p50, &p99);
  free(l.samples);
  return p99;
}

/* ---- clients ------------------------------------------------------------ */

static int port;
static atomic_bool client_done;
static uv_async_t wake;

static int connect_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    perror("connect");
    exit(1);
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static void send_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t m = send(fd, p, n, MSG_NOSIGNAL);
    if (m <= 0) exit(1);
    p += m;
    n -= (size_t)m;
  }
}

static uint64_t scrape_ns[N_SCRAPES];
static size_t metrics_bytes;

static void *scraper(void *arg) {
  (void)arg;
  int fd = connect_port();
  static char buf[1 << 22];
  const char *req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  for (int i = 0; i < N_SCRAPES; i++) {
    uint64_t t0 = uv_hrtime();
    send_all(fd, req, strlen(req));
    size_t len = 0, want = 0, hlen = 0;
    for (;;) {
      ssize_t m = recv(fd, buf + len, sizeof buf - len - 1, 0);
      if (m <= 0) {
        fprintf(stderr, "scrape %d: connection closed\n", i);
        exit(1);
      }
      len += (size_t)m;
      buf[len] = '\0';
      if (hlen == 0) {
        char *e = strstr(buf, "\r\n\r\n");
        if (e == NULL) continue;
        hlen = (size_t)(e + 4 - buf);
        char *cl = strcasestr(buf, "content-length:");
        if (cl == NULL) exit(1);
        want = strtoul(cl + 15, NULL, 10);
      }
      if (len >= hlen + want) break;
    }
    scrape_ns[i] = uv_hrtime() - t0;
    metrics_bytes = want;
  }
  close(fd);
  atomic_store(&client_done, true);
  uv_async_send(&wake);
  return NULL;
}

typedef struct wsclient {
  int fd;
  char *buf;
  size_t len, cap;
  long long last_seq;
  uint64_t frames, lost, bytes;
} wsclient;

static wsclient ws[N_WS];
static atomic_bool ws_stop;
static atomic_int ws_ready;

static void ws_handshake(wsclient *c) {
  c->fd = connect_port();
  const char *req =
      "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
  send_all(c->fd, req, strlen(req));
  char h[2048];
  size_t n = 0;
  while (n < sizeof h - 1) {
    if (recv(c->fd, h + n, 1, 0) != 1) exit(1);
    n++;
    if (n >= 4 && memcmp(h + n - 4, "\r\n\r\n", 4) == 0) break;
  }
  h[n] = '\0';
  if (strstr(h, " 101 ") == NULL) {
    fprintf(stderr, "ws handshake: %s\n", h);
    exit(1);
  }
  c->last_seq = -1;
  c->cap = 1 << 16;
  c->buf = malloc(c->cap);
}

/* A message's first fragment carries its type and seq; a message counts
 * once, when its last fragment (FIN) arrives. */
static void ws_message_start(wsclient *c, const char *p, size_t n) {
  const char *s = strstr(p, "\"seq\":");
  if (s == NULL || s > p + n) return;
  long long seq = strtoll(s + 6, NULL, 10);
  bool snapshot = strncmp(p, "{\"type\":\"snapshot\"", 18) == 0;
  if (!snapshot && c->last_seq >= 0 && seq > c->last_seq + 1)
    c->lost += (uint64_t)(seq - c->last_seq - 1);
  c->last_seq = seq;
}

static void ws_read(wsclient *c) {
  if (c->cap - c->len < 65536) {
    c->cap *= 2;
    c->buf = realloc(c->buf, c->cap);
  }
  ssize_t m = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
  if (m <= 0) return;
  c->len += (size_t)m;
  for (;;) {
    if (c->len < 2) return;
    unsigned char *b = (unsigned char *)c->buf;
    bool fin = (b[0] & 0x80) != 0;
    unsigned opcode = b[0] & 0x0f;
    size_t hl = 2, pl = b[1] & 0x7f;
    if (pl == 126) {
      if (c->len < 4) return;
      pl = ((size_t)b[2] << 8) | b[3];
      hl = 4;
    } else if (pl == 127) {
      if (c->len < 10) return;
      pl = 0;
      for (int i = 0; i < 8; i++) pl = (pl << 8) | b[2 + i];
      hl = 10;
    }
    if (c->len < hl + pl) return;
    char save = c->buf[hl + pl];
    c->buf[hl + pl] = '\0';
    if (opcode != 0) ws_message_start(c, c->buf + hl, pl);
    c->bytes += pl;
    if (fin) c->frames++;
    c->buf[hl + pl] = save;
    memmove(c->buf, c->buf + hl + pl, c->len - hl - pl);
    c->len -= hl + pl;
  }
}

static void *ws_reader(void *arg) {
  (void)arg;
  struct pollfd pfd[N_WS];
  for (int i = 0; i < N_WS; i++) {
    ws_handshake(&ws[i]);
    pfd[i].fd = ws[i].fd;
    pfd[i].events = POLLIN;
    atomic_fetch_add(&ws_ready, 1);
  }
  while (!atomic_load(&ws_stop)) {
    if (poll(pfd, N_WS, 50) <= 0) continue;
    for (int i = 0; i < N_WS; i++)
      if (pfd[i].revents & POLLIN) ws_read(&ws[i]);
  }
  for (int i = 0; i < N_WS; i++) {
    close(ws[i].fd);
    free(ws[i].buf);
  }
  return NULL;
}

static void on_wake(uv_async_t *a) {
  (void)a;
}

int main(void) {
  uv_loop_init(&loop);
  uv_async_init(&loop, &wake, on_wake);
  uv_unref((uv_handle_t *)&wake);
  for (int i = 0; i < N_BREAKERS; i++) {
    keel_breaker_opts o;
    keel_breaker_opts_init(&o);
    keel_breaker_new(&loop, &o, &breakers[i]);
  }
  for (int i = 0; i < N_QUEUES; i++) {
    keel_queue_opts o;
    keel_queue_opts_init(&o);
    o.concurrency = 8;
    keel_queue_new(&loop, process, &o, &queues[i]);
  }
  for (int i = 0; i < N_RETRIES; i++) {
    keel_retry_opts o;
    keel_retry_opts_init(&o);
    keel_retry_start(&loop, &o, never_attempt, retry_done, NULL, &retries[i]);
  }
  uv_timer_t churn;
  uv_timer_init(&loop, &churn);
  uv_timer_start(&churn, on_churn, 10, 10);
  /* warm the queues' histograms */
  for (int r = 0; r < 200; r++) {
    on_churn(&churn);
    uv_run(&loop, UV_RUN_NOWAIT);
  }

  double base_p99 = measure_lateness(PHASE_MS);

  keel_serve_opts so;
  keel_serve_opts_init(&so);
  so.port = 0;
  so.ws_interval_ms = 100;
  so.max_clients = 256;
  keel_serve *s;
  if (keel_serve_new(&loop, &so, &s) != 0) return 1;
  port = keel_serve_port(s);
  char name[64];
  for (int i = 0; i < N_BREAKERS; i++) {
    snprintf(name, sizeof name, "breaker-%03d", i);
    keel_breaker_serve(s, breakers[i], name);
  }
  for (int i = 0; i < N_QUEUES; i++) {
    snprintf(name, sizeof name, "queue-%03d", i);
    keel_queue_serve(s, queues[i], name);
  }
  for (int i = 0; i < N_RETRIES; i++) {
    snprintf(name, sizeof name, "retry-%03d", i);
    keel_retry_serve(s, retries[i], name);
  }
  for (int i = 0; i < N_CUSTOM; i++) {
    snprintf(name, sizeof name, "custom-%03d", i);
    keel_serve_register(s, &custom_source, &custom_values[i], name, NULL);
  }
  keel_serve_stats st;
  keel_serve_get_stats(s, &st);

  {
    uint64_t t0 = uv_hrtime();
    for (int i = 0; i < 10; i++) {
      char *text;
      size_t len;
      keel_serve_metrics_text(s, &text, &len);
      if (i == 0) {
        int types = 0;
        for (const char *q = text; (q = strstr(q, "# TYPE ")) != NULL; q++) types++;
        printf("families: %d, bytes %zu\n", types, len);
      }
      keel_free(text);
    }
    printf("render: %.0f us per /metrics text\n", (double)(uv_hrtime() - t0) / 10 / 1000);
  }
  /* 2. scrapes */
  pthread_t t;
  atomic_store(&client_done, false);
  pthread_create(&t, NULL, scraper, NULL);
  while (!atomic_load(&client_done)) uv_run(&loop, UV_RUN_ONCE);
  pthread_join(t, NULL);
  double scrape_p50, scrape_p99;
  bench_percentiles_us(scrape_ns, N_SCRAPES, &scrape_p50, &scrape_p99);
  printf("registered %u objects; /metrics %zu bytes: p50 %.0f us, p99 %.0f us over %d scrapes\n",
         st.registered, metrics_bytes, scrape_p50, scrape_p99, N_SCRAPES);

  /* 3. WebSocket clients + the 1 ms timer */
  pthread_create(&t, NULL, ws_reader, NULL);
  while (atomic_load(&ws_ready) < N_WS) uv_run(&loop, UV_RUN_NOWAIT);
  for (int i = 0; i < 50; i++) uv_run(&loop, UV_RUN_NOWAIT); /* snapshots out */
  double ws_p99 = measure_lateness(PHASE_MS);
  keel_serve_get_stats(s, &st);
  atomic_store(&ws_stop, true);
  pthread_join(t, NULL);
  uint64_t frames = 0, lost = 0;
  for (int i = 0; i < N_WS; i++) {
    frames += ws[i].frames;
    lost += ws[i].lost;
  }
  lost += st.frames_dropped;
  printf(
      "%d WebSocket clients: %llu frames received, %llu sent, %llu dropped by the server, "
      "%llu sequence gaps\n",
      N_WS, (unsigned long long)frames, (unsigned long long)st.frames_sent,
      (unsigned long long)st.frames_dropped, (unsigned long long)(lost - st.frames_dropped));
  uint64_t ws_bytes = 0;
  for (int i = 0; i < N_WS; i++) ws_bytes += ws[i].bytes;
  printf("%.0f bytes per WebSocket message on average\n",
         frames ? (double)ws_bytes / (double)frames : 0.0);
  printf("1 ms timer lateness p99: %.0f us with the server and %d clients, %.0f us without\n",
         ws_p99, N_WS, base_p99);

  keel_serve_close(s, NULL, NULL);
  for (int i = 0; i < N_BREAKERS; i++) keel_breaker_close(breakers[i], NULL, NULL);
  for (int i = 0; i < N_QUEUES; i++) keel_queue_close(queues[i], NULL, NULL);
  for (int i = 0; i < N_RETRIES; i++) keel_retry_close(retries[i], NULL, NULL);
  uv_close((uv_handle_t *)&churn, NULL);
  uv_close((uv_handle_t *)&wake, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  int rc = uv_loop_close(&loop);
  printf(
      "serve scrape_p99_us=%.0f metrics_bytes=%zu ws_clients=%d lateness_p99_us=%.0f "
      "base_lateness_p99_us=%.0f lost_frames=%llu\n",
      scrape_p99, metrics_bytes, N_WS, ws_p99, base_p99, (unsigned long long)lost);
  return rc == 0 ? 0 : 1;
}
