/* Pub/sub on the client's subscriber connection, against real servers:
 * messages on channels and patterns, several subscriptions of one channel,
 * unsubscribe, resubscription after a Redis restart, close, the callback
 * order and allocation failure. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keel/redis.h"
#include "redis_server.h"
#include "support/harness.h"

#define MAXM 64

typedef struct subx {
  keel_redis_sub *sub;
  int ready, lost, ended, end_status, messages, last_lost;
  int order_bad; /* an event after ENDED, or a MESSAGE before READY */
  char payload[MAXM][64];
  char channel[MAXM][64];
  bool pattern_seen;
  bool unsubscribe_on_message;
  keel_redis *close_on_message; /* closes this client from inside MESSAGE */
  int after_close_rc;
} subx;

static void on_event(keel_redis_sub *sub, keel_redis_sub_event ev, int status,
                     const keel_redis_message *m, void *data) {
  subx *x = data;
  if (x->ended) x->order_bad++;
  switch (ev) {
    case KEEL_REDIS_SUB_READY:
      x->ready++;
      break;
    case KEEL_REDIS_SUB_LOST:
      x->lost++;
      x->last_lost = status;
      break;
    case KEEL_REDIS_SUB_ENDED:
      x->ended++;
      x->end_status = status;
      break;
    case KEEL_REDIS_SUB_MESSAGE:
      if (x->ready == 0) x->order_bad++;
      if (x->messages < MAXM) {
        snprintf(x->payload[x->messages], 64, "%.*s", (int)m->payload_len, m->payload);
        snprintf(x->channel[x->messages], 64, "%.*s", (int)m->channel_len, m->channel);
      }
      if (m->pattern != NULL) x->pattern_seen = true;
      x->messages++;
      if (x->unsubscribe_on_message) cr_assert_eq(keel_redis_unsubscribe(sub), 0);
      if (x->close_on_message != NULL) {
        keel_redis_close(x->close_on_message, NULL, NULL);
        x->after_close_rc = keel_redis_unsubscribe(sub);
        x->close_on_message = NULL;
      }
      break;
  }
}

static void shared_url(char *buf, size_t cap) {
  char host[64];
  int port;
  kt_redis_addr(host, sizeof host, &port);
  snprintf(buf, cap, "redis://%s:%d", host, port);
}

static keel_redis *open_client(uv_loop_t *loop, const char *url) {
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = url;
  o.command_timeout_ms = 1000;
  keel_redis *r;
  cr_assert_eq(keel_redis_new(loop, &o, &r), 0);
  return r;
}

static int publish_rc;
static long long publish_receivers;
static void on_published(keel_redis *r, int status, const struct redisReply *rep, void *data) {
  (void)r;
  (void)data;
  publish_rc = status;
  publish_receivers = keel_redis_reply_integer(rep);
}

/* PUBLISH channel payload on r and waits for the reply; returns receivers. */
static long long publish(uv_loop_t *loop, keel_redis *r, const char *channel, const char *payload) {
  const char *argv[] = {"PUBLISH", channel, payload};
  publish_rc = 1;
  cr_assert_eq(keel_redis_command(r, 3, argv, NULL, on_published, NULL), 0);
  while (publish_rc == 1) uv_run(loop, UV_RUN_ONCE);
  cr_assert_eq(publish_rc, 0);
  return publish_receivers;
}

static bool is_ready(void *c) {
  return ((subx *)c)->ready > 0;
}
static bool has_message(void *c) {
  return ((subx *)c)->messages > 0;
}
static bool has_two_messages(void *c) {
  return ((subx *)c)->messages > 1;
}
static bool has_ended(void *c) {
  return ((subx *)c)->ended > 0;
}

Test(redis_pubsub, channel_pattern_and_unsubscribe, .timeout = 60) {
  char url[128], ch[64], pat[80];
  shared_url(url, sizeof url);
  kt_unique_name(ch, sizeof ch, "ps");
  snprintf(pat, sizeof pat, "%s*", ch);
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis *r = open_client(&loop, url);
  subx a = {0}, b = {0}, p = {0};
  cr_assert_eq(keel_redis_subscribe(r, ch, strlen(ch), false, on_event, &a, &a.sub), 0);
  cr_assert_eq(keel_redis_subscribe(r, ch, strlen(ch), false, on_event, &b, &b.sub), 0);
  cr_assert_eq(keel_redis_subscribe(r, pat, strlen(pat), true, on_event, &p, &p.sub), 0);
  cr_assert_eq(a.ready + b.ready + p.ready, 0, "nothing inside the call");
  cr_assert(kt_wait_for(&loop, is_ready, &a, 5000));
  cr_assert(kt_wait_for(&loop, is_ready, &b, 5000));
  cr_assert(kt_wait_for(&loop, is_ready, &p, 5000));
  keel_redis_pubsub_stats st;
  keel_redis_get_pubsub_stats(r, &st);
  cr_assert_eq(st.subscriptions, 3);
  cr_assert_eq(st.channels, 2, "one SUBSCRIBE for two subscriptions, one PSUBSCRIBE");
  cr_assert(st.connected);
  /* one connection on the channel and one on the pattern (Redis counts
   * clients: the same connection twice) */
  cr_assert_eq(publish(&loop, r, ch, "hello"), 2);
  cr_assert(kt_wait_for(&loop, has_message, &a, 5000));
  cr_assert(kt_wait_for(&loop, has_message, &b, 5000));
  cr_assert(kt_wait_for(&loop, has_message, &p, 5000));
  cr_assert_str_eq(a.payload[0], "hello");
  cr_assert_str_eq(b.channel[0], ch);
  cr_assert(p.pattern_seen);
  cr_assert_not(a.pattern_seen);
  /* binary payload */
  const char bin[] = {'x', '\0', 'y'};
  const char *argv[] = {"PUBLISH", ch, bin};
  size_t lens[] = {7, strlen(ch), 3};
  cr_assert_eq(keel_redis_command(r, 3, argv, lens, NULL, NULL), 0);
  cr_assert(kt_wait_for(&loop, has_two_messages, &a, 5000));
  /* unsubscribe: no message after, ENDED(0) later, never inside */
  cr_assert_eq(keel_redis_unsubscribe(a.sub), 0);
  cr_assert_eq(keel_redis_unsubscribe(a.sub), UV_EINVAL, "already ending");
  cr_assert_eq(a.ended, 0);
  int a_msgs = a.messages;
  cr_assert(kt_wait_for(&loop, has_ended, &a, 5000));
  cr_assert_eq(a.end_status, 0);
  cr_assert_eq(publish(&loop, r, ch, "third"), 2, "b still subscribes the channel");
  cr_assert(kt_wait_for(&loop, has_message, &b, 5000));
  uint64_t t0 = uv_now(&loop);
  while (uv_now(&loop) - t0 < 100) uv_run(&loop, UV_RUN_NOWAIT);
  cr_assert_eq(a.messages, a_msgs);
  /* the last subscription of the channel: UNSUBSCRIBE on the wire */
  b.unsubscribe_on_message = true;
  int b_msgs = b.messages;
  cr_assert_eq(publish(&loop, r, ch, "fourth"), 2);
  cr_assert(kt_wait_for(&loop, has_ended, &b, 5000));
  cr_assert_eq(b.messages, b_msgs + 1, "unsubscribed from inside its own callback");
  t0 = uv_now(&loop);
  while (uv_now(&loop) - t0 < 100) uv_run(&loop, UV_RUN_NOWAIT);
  keel_redis_get_pubsub_stats(r, &st);
  cr_assert_eq(st.subscriptions, 1);
  cr_assert_eq(st.channels, 1);
  cr_assert_geq(st.messages, 4);
  cr_assert_eq(publish(&loop, r, ch, "fifth"), 1, "only the pattern now");
  /* close ends the rest with UV_ECANCELED */
  keel_redis_close(r, NULL, NULL);
  cr_assert_eq(p.ended, 0);
  kt_loop_finish(&loop);
  cr_assert_eq(p.ended, 1);
  cr_assert_eq(p.end_status, UV_ECANCELED);
  cr_assert_eq(a.order_bad + b.order_bad + p.order_bad, 0);
}

Test(redis_pubsub, bad_arguments) {
  char url[128];
  shared_url(url, sizeof url);
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis *r = open_client(&loop, url);
  subx a = {0};
  keel_redis_sub *s = (void *)1;
  cr_assert_eq(keel_redis_subscribe(NULL, "c", 1, false, on_event, &a, &s), UV_EINVAL);
  cr_assert_eq(keel_redis_subscribe(r, "c", 0, false, on_event, &a, &s), UV_EINVAL);
  cr_assert_eq(keel_redis_subscribe(r, "c", 1, false, NULL, &a, &s), UV_EINVAL);
  cr_assert_eq(keel_redis_subscribe(r, NULL, 1, false, on_event, &a, &s), UV_EINVAL);
  cr_assert_eq(s, (void *)1);
  cr_assert_eq(keel_redis_unsubscribe(NULL), UV_EINVAL);
  const char *argv[] = {"subscribe", "c"};
  cr_assert_eq(keel_redis_command(r, 2, argv, NULL, NULL, NULL), UV_EINVAL);
  keel_redis_close(r, NULL, NULL);
  cr_assert_eq(keel_redis_subscribe(r, "c", 1, false, on_event, &a, &s), KEEL_ECLOSING);
  kt_loop_finish(&loop);
}

static bool ready_twice(void *c) {
  return ((subx *)c)->ready >= 2;
}
static bool is_lost(void *c) {
  return ((subx *)c)->lost > 0;
}

Test(redis_pubsub, resubscribes_after_a_restart, .timeout = 120) {
  kt_redis_server srv;
  kt_redis_server_start(&srv);
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis *r = open_client(&loop, srv.url);
  subx a = {0}, p = {0};
  cr_assert_eq(keel_redis_subscribe(r, "news", 4, false, on_event, &a, &a.sub), 0);
  cr_assert_eq(keel_redis_subscribe(r, "ne*", 3, true, on_event, &p, &p.sub), 0);
  cr_assert(kt_wait_for(&loop, is_ready, &a, 5000));
  cr_assert(kt_wait_for(&loop, is_ready, &p, 5000));
  kt_redis_server_stop(&srv);
  cr_assert(kt_wait_for(&loop, is_lost, &a, 10000), "LOST told");
  cr_assert_eq(a.last_lost, KEEL_ECONN);
  keel_redis_pubsub_stats st;
  keel_redis_get_pubsub_stats(r, &st);
  cr_assert_not(st.connected);
  cr_assert_eq(st.channels, 0);
  kt_redis_server_restart(&srv);
  cr_assert(kt_wait_for(&loop, ready_twice, &a, 20000), "READY again after the restart");
  cr_assert(kt_wait_for(&loop, ready_twice, &p, 20000));
  cr_assert_eq(a.lost, 1, "once per loss");
  cr_assert_eq(publish(&loop, r, "news", "back"), 2);
  cr_assert(kt_wait_for(&loop, has_message, &a, 5000));
  cr_assert(kt_wait_for(&loop, has_message, &p, 5000));
  cr_assert_str_eq(a.payload[0], "back");
  keel_redis_get_pubsub_stats(r, &st);
  cr_assert_eq(st.resubscribes, 2);
  cr_assert_geq(st.disconnects, 1);
  cr_assert_geq(st.connects, 2);
  cr_assert_eq(st.channels, 2);
  keel_redis_close(r, NULL, NULL);
  kt_loop_finish(&loop);
  cr_assert_eq(a.end_status, UV_ECANCELED);
  cr_assert_eq(a.order_bad + p.order_bad, 0);
  kt_redis_server_destroy(&srv);
}

Test(redis_pubsub, no_reconnect_ends_subscriptions, .timeout = 60) {
  kt_redis_server srv;
  kt_redis_server_start(&srv);
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = srv.url;
  o.reconnect = false;
  keel_redis *r;
  cr_assert_eq(keel_redis_new(&loop, &o, &r), 0);
  subx a = {0};
  cr_assert_eq(keel_redis_subscribe(r, "x", 1, false, on_event, &a, &a.sub), 0);
  cr_assert(kt_wait_for(&loop, is_ready, &a, 5000));
  kt_redis_server_stop(&srv);
  cr_assert(kt_wait_for(&loop, has_ended, &a, 10000));
  cr_assert_eq(a.end_status, KEEL_ECONN);
  subx b = {0};
  keel_redis_sub *s;
  cr_assert_eq(keel_redis_subscribe(r, "x", 1, false, on_event, &b, &s), KEEL_ECONN);
  keel_redis_close(r, NULL, NULL);
  kt_loop_finish(&loop);
  kt_redis_server_destroy(&srv);
}

Test(redis_pubsub, close_from_inside_a_message, .timeout = 60) {
  char url[128], ch[64];
  shared_url(url, sizeof url);
  kt_unique_name(ch, sizeof ch, "psc");
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis *r = open_client(&loop, url);
  keel_redis *pub = open_client(&loop, url);
  subx a = {0}, b = {0};
  a.close_on_message = r;
  cr_assert_eq(keel_redis_subscribe(r, ch, strlen(ch), false, on_event, &a, &a.sub), 0);
  cr_assert_eq(keel_redis_subscribe(r, ch, strlen(ch), false, on_event, &b, &b.sub), 0);
  cr_assert(kt_wait_for(&loop, is_ready, &a, 5000));
  cr_assert(kt_wait_for(&loop, is_ready, &b, 5000));
  cr_assert_eq(publish(&loop, pub, ch, "bye"), 1);
  cr_assert(kt_wait_for(&loop, has_ended, &a, 5000));
  cr_assert(kt_wait_for(&loop, has_ended, &b, 5000));
  cr_assert_eq(a.after_close_rc, KEEL_ECLOSING);
  cr_assert_eq(a.messages, 1);
  cr_assert_eq(b.messages, 0, "closed before its turn: no message after close");
  cr_assert_eq(a.end_status, UV_ECANCELED);
  cr_assert_eq(b.end_status, UV_ECANCELED);
  keel_redis_close(pub, NULL, NULL);
  kt_loop_finish(&loop);
  cr_assert_eq(a.order_bad + b.order_bad, 0);
}

static char fm_url[128];

static void pubsub_failmalloc(void *arg) {
  (void)arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_redis_opts o;
  keel_redis_opts_init(&o);
  o.url = fm_url;
  o.command_timeout_ms = 300;
  keel_redis *r = NULL;
  subx a = {0}, b = {0};
  if (keel_redis_new(&loop, &o, &r) == 0) {
    int ra = keel_redis_subscribe(r, "fm", 2, false, on_event, &a, &a.sub);
    int rb = keel_redis_subscribe(r, "fm*", 3, true, on_event, &b, &b.sub);
    uint64_t start = uv_now(&loop);
    while (uv_now(&loop) - start < 40 && (ra != 0 || a.ready == 0)) uv_run(&loop, UV_RUN_NOWAIT);
    const char *argv[] = {"PUBLISH", "fm", "m"};
    keel_redis_command(r, 3, argv, NULL, NULL, NULL);
    start = uv_now(&loop);
    while (uv_now(&loop) - start < 20) uv_run(&loop, UV_RUN_NOWAIT);
    if (ra == 0 && a.ended == 0) keel_redis_unsubscribe(a.sub);
    keel_redis_close(r, NULL, NULL);
    kt_loop_finish(&loop);
    cr_assert_eq(a.ended, ra == 0 ? 1 : 0, "ENDED exactly once");
    cr_assert_eq(b.ended, rb == 0 ? 1 : 0);
    return;
  }
  kt_loop_finish(&loop);
}

Test(redis_pubsub, allocation_failure_is_an_input, .timeout = 600) {
  shared_url(fm_url, sizeof fm_url);
  kt_failmalloc_run(pubsub_failmalloc, NULL);
  cr_assert_gt(kt_failmalloc_count(), 0);
}
