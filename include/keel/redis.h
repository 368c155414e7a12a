/*
 * keel/redis.h — asynchronous Redis on a libuv loop, and distributed locks
 * with fencing tokens built on it.
 *
 * A keel_redis is one hiredis (0.14) async connection driven by the user's
 * uv_loop_t. Commands are pipelined: each is written as soon as it is given,
 * and its reply reaches its callback exactly once. Every command has a
 * timeout (hiredis has none: keel keeps one uv_timer per connection); a
 * command that times out after it was sent has an unknown outcome, so the
 * connection is reset and reconnects with backoff. While disconnected,
 * commands wait (up to their timeout, at most opts.max_pending of them).
 * Scripts (keel_redis_script) run by EVALSHA; on NOSCRIPT (a restart, a
 * failover, SCRIPT FLUSH) keel sends EVAL once and reloads the script.
 * Replies are read by hiredis's reader; keel hands them out as hiredis's
 * `struct redisReply`, readable through the keel_redis_reply_*() accessors
 * below (or <hiredis/hiredis.h> directly).
 *
 *     static void on_reply(keel_redis *r, int status, const struct redisReply *rep,
 *                          void *data) {
 *       if (status == 0) printf("%lld\n", keel_redis_reply_integer(rep));
 *       else fprintf(stderr, "%s: %s\n", keel_err_name(status), keel_redis_last_error(r));
 *     }
 *     keel_redis_opts o; keel_redis_opts_init(&o);
 *     o.url = "redis://:secret@127.0.0.1:6379/2";
 *     keel_redis *r; keel_redis_new(loop, &o, &r);
 *     const char *argv[] = {"INCR", "visits"};
 *     keel_redis_command(r, 2, argv, NULL, on_reply, NULL);
 *     ...
 *     keel_redis_close(r, on_closed, NULL);
 *
 * A lock (keel_redis_lock_acquire) is a Redis key set with NX PX to a random
 * 128-bit token, taken in one script with an INCR of a per-name counter: the
 * fencing token. Only the owner (the token) releases or extends it; an
 * optional watchdog renews it every ttl/3. Redlock (keel_redis_redlock_acquire)
 * takes the same lock on a majority of N independent servers. A lock alone
 * is for efficiency only: guard the protected write with the fence
 * (docs/redis.md, "Fencing"):
 *
 *     UPDATE slots SET owner = $1, fence = $2 WHERE id = $3 AND fence < $2
 *
 * Callback rule (every callback of this header): never called inside the
 * keel call that caused it, always on a later loop iteration; out-params are
 * set before any callback; keel_redis_close() may be called from inside any
 * callback of the client or of its locks.
 */
#ifndef KEEL_REDIS_H
#define KEEL_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "keel/common.h"
#include "keel/retry.h"

#ifdef __cplusplus
extern "C" {
#endif

/* hiredis's reply type (<hiredis/hiredis.h>); include that header only if
 * you want to read its fields directly instead of using the accessors. */
struct redisReply;

typedef struct keel_redis keel_redis;

/* ---- replies ------------------------------------------------------------ */

/* Reply types; the values are hiredis's REDIS_REPLY_* constants. */
typedef enum keel_redis_reply_type {
  KEEL_REDIS_REPLY_NONE = 0, /* NULL reply (no reply: status < 0) */
  KEEL_REDIS_REPLY_STRING = 1,
  KEEL_REDIS_REPLY_ARRAY = 2,
  KEEL_REDIS_REPLY_INTEGER = 3,
  KEEL_REDIS_REPLY_NIL = 4,
  KEEL_REDIS_REPLY_STATUS = 5,
  KEEL_REDIS_REPLY_ERROR = 6
} keel_redis_reply_type;

/*
 * Reply accessors. A reply is valid only during the reply callback (copy
 * what you keep). All are NULL-safe and never fail: a NULL reply or an
 * out-of-range index gives the "nothing" value stated. Any thread (they
 * only read the reply).
 */
/* Type of rep; KEEL_REDIS_REPLY_NONE for NULL. */
KEEL_EXTERN keel_redis_reply_type keel_redis_reply_type_of(const struct redisReply *rep);
/* Integer value of an INTEGER reply; 0 for any other type. */
KEEL_EXTERN long long keel_redis_reply_integer(const struct redisReply *rep);
/* Bytes of a STRING, STATUS or ERROR reply (NUL-terminated; binary-safe with
 * *len); NULL (and *len = 0) for other types. len may be NULL. */
KEEL_EXTERN const char *keel_redis_reply_str(const struct redisReply *rep, size_t *len);
/* Number of elements of an ARRAY reply; 0 for other types. */
KEEL_EXTERN size_t keel_redis_reply_elements(const struct redisReply *rep);
/* Element i of an ARRAY reply; NULL when out of range or not an array. */
KEEL_EXTERN const struct redisReply *keel_redis_reply_element(const struct redisReply *rep,
                                                              size_t i);

/*
 * Called exactly once per accepted command, on a later loop iteration.
 * status:
 *   0               a reply arrived; rep is it (never an error reply);
 *   KEEL_EREDIS     the server answered with an error reply: rep is that
 *                   reply (keel_redis_reply_str() gives "ERR ..."), also
 *                   copied into keel_redis_last_error(r); the command did
 *                   not take effect (a script's error: up to the script);
 *   UV_ETIMEDOUT    no reply within the command's timeout; rep NULL. If it
 *                   had been sent its outcome is unknown, and the
 *                   connection was reset (the other commands in flight get
 *                   KEEL_EINDOUBT); if it was still waiting for a
 *                   connection it was never sent;
 *   KEEL_EINDOUBT   sent, then the connection was lost before its reply:
 *                   it may or may not have taken effect; rep NULL;
 *   KEEL_ECONN      certainly not executed (never sent: the connection
 *                   failed for good, see keel_redis_opts.reconnect); rep NULL;
 *   UV_ECANCELED    dropped by keel_redis_close() (a command already sent
 *                   may have run); rep NULL.
 * rep is owned by keel and valid only during the call.
 */
typedef void (*keel_redis_reply_cb)(keel_redis *r, int status, const struct redisReply *rep,
                                    void *data);

/* ---- connection ---------------------------------------------------------- */

typedef enum keel_redis_state {
  KEEL_REDIS_CONNECTING = 0, /* connecting (or sending AUTH / SELECT) */
  KEEL_REDIS_READY = 1,      /* connected, commands flow */
  KEEL_REDIS_DOWN = 2        /* lost or failed; a reconnect is scheduled
                                (or not, when opts.reconnect is false) */
} keel_redis_state;

/*
 * Called on each state change: READY after a connect (and AUTH / SELECT)
 * succeeded; DOWN with the reason when a connect failed or the connection
 * was lost (KEEL_ECONN, UV_ETIMEDOUT for a connect or command timeout,
 * KEEL_EAUTH when AUTH was refused, KEEL_EREDIS when SELECT was refused,
 * KEEL_EPROTO for a protocol error); the text is in keel_redis_last_error().
 * CONNECTING is reported when a reconnect attempt starts. Never called
 * inside a keel call; never after keel_redis_close() was called. (The
 * command connection only: the subscriber connection's losses reach the
 * subscriptions, see keel_redis_subscribe().)
 */
typedef void (*keel_redis_state_cb)(keel_redis *r, keel_redis_state state, int status, void *data);

/* Default bound on commands waiting or in flight (max_pending). */
#define KEEL_REDIS_MAX_PENDING_DEFAULT 65536u

typedef struct keel_redis_opts {
  /* Where to connect (copied), required:
   *   redis://[[user]:password@]host[:port][/db]    (port 6379, db 0)
   *   unix://[[user]:password@]/path/to/socket[?db=N]
   * host may be an IPv4/IPv6 literal ([::1]) or a name; a name is resolved
   * by hiredis with a blocking getaddrinfo at each connect: prefer literals.
   * The scheme may be in any case (REDIS://). With a non-empty password keel
   * sends AUTH [user] password, with db != 0 SELECT db, before any user
   * command; an empty password (redis://:@host) means no AUTH; a user
   * without a non-empty password (user@, user:@) is UV_EINVAL. %XX escapes
   * in user and password are decoded. */
  const char *url;
  uint32_t connect_timeout_ms;    /* connect + AUTH + SELECT; default 2000 (0 = 2000) */
  uint32_t command_timeout_ms;    /* default per command, counted from the call;
                                     default 2000 (0 = 2000) */
  keel_backoff reconnect_backoff; /* default full jitter 50 ms x2, cap 5000 ms */
  bool reconnect;                 /* default true. false: after the first loss or
                                     failed connect the client stays DOWN and waiting
                                     commands fail with KEEL_ECONN */
  uint32_t max_pending;           /* commands accepted and not yet answered (waiting
                                     for a connection or in flight): beyond it
                                     keel_redis_command() returns UV_ENOBUFS; default
                                     KEEL_REDIS_MAX_PENDING_DEFAULT (0 = default) */
  keel_redis_state_cb on_state;   /* may be NULL */
  void *data;                     /* passed to on_state */
  uint64_t reserved_[8];          /* ABI room: zero (opts_init does); never set */
} keel_redis_opts;

/* Zeroes *opts (reserved_ included) and fills the defaults above.
 * NULL-safe. Thread-safe. */
KEEL_EXTERN void keel_redis_opts_init(keel_redis_opts *opts);

/*
 * Creates a client and starts connecting on a later loop iteration (no
 * callback runs inside this call). Commands may be given at once; they are
 * sent once the connection is READY. opts and its strings are copied.
 * Returns 0 and sets *out; UV_EINVAL (NULL loop, opts, out or url, a URL
 * that does not parse, db out of 0..65535, a bad backoff) or UV_ENOMEM.
 * *out is untouched on failure. Loop thread only.
 */
KEEL_EXTERN int keel_redis_new(uv_loop_t *loop, const keel_redis_opts *opts, keel_redis **out);

/*
 * Sends a command: argc arguments argv[i] of argvlen[i] bytes (binary-safe;
 * argvlen NULL: each argv[i] is a NUL-terminated string). The arguments
 * are copied before this returns. cb (may be NULL) is called exactly once,
 * on a later loop iteration (see keel_redis_reply_cb). The timeout is
 * opts.command_timeout_ms, counted from this call.
 * Do not send SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE,
 * SUNSUBSCRIBE, MONITOR, QUIT, HELLO or CLIENT REPLY (any case) with it:
 * they change the connection's protocol (UV_EINVAL, nothing sent);
 * subscribe and unsubscribe with keel_redis_subscribe() /
 * keel_redis_unsubscribe().
 * Returns 0; or, with nothing sent and cb never called:
 *   UV_EINVAL     NULL r or argv, argc < 1, a NULL argv[i], or one of the
 *                 commands above;
 *   UV_ENOBUFS    opts.max_pending commands are already pending;
 *   KEEL_ECONN    the client is DOWN for good (opts.reconnect false);
 *   KEEL_ECLOSING keel_redis_close() was called;
 *   UV_ENOMEM.
 * Loop thread only.
 */
KEEL_EXTERN int keel_redis_command(keel_redis *r, int argc, const char *const *argv,
                                   const size_t *argvlen, keel_redis_reply_cb cb, void *data);

/* keel_redis_command() with its own timeout (ms, counted from this call;
 * 0 = opts.command_timeout_ms). Same returns. Loop thread only. */
KEEL_EXTERN int keel_redis_command_timeout(keel_redis *r, uint64_t timeout_ms, int argc,
                                           const char *const *argv, const size_t *argvlen,
                                           keel_redis_reply_cb cb, void *data);

/* ---- scripts --------------------------------------------------------------- */

/*
 * A Lua script: its source and SHA-1. A plain value with no allocation,
 * usable with any number of clients; keel_redis_eval() sends EVALSHA, and
 * on NOSCRIPT sends SCRIPT LOAD and EVAL (once) with the same arguments.
 * Fields are read-only after keel_redis_script_init().
 */
typedef struct keel_redis_script {
  const char *source; /* not copied: must outlive every eval using it */
  size_t len;         /* strlen(source) */
  char sha1[41];      /* lower-case hex, NUL-terminated */
} keel_redis_script;

/* Fills *s for source (computes its SHA-1). Returns 0, or UV_EINVAL for a
 * NULL s or source (s untouched). Any thread. */
KEEL_EXTERN int keel_redis_script_init(keel_redis_script *s, const char *source);

/*
 * Runs script s with nkeys keys followed by the other arguments: argv[0 ..
 * nkeys-1] are KEYS, argv[nkeys .. argc-1] are ARGV (argvlen as in
 * keel_redis_command(); argc may be 0 with argv NULL). Arguments are copied.
 * The reply callback is as for a command; a NOSCRIPT error is never
 * reported (keel resends with EVAL); the script's own errors give
 * KEEL_EREDIS. Counts as one pending command. Returns as
 * keel_redis_command(), plus UV_EINVAL for a NULL s, nkeys < 0 or
 * nkeys > argc. Loop thread only.
 */
KEEL_EXTERN int keel_redis_eval(keel_redis *r, const keel_redis_script *s, int nkeys, int argc,
                                const char *const *argv, const size_t *argvlen,
                                keel_redis_reply_cb cb, void *data);

/* keel_redis_eval() with its own timeout (0 = opts.command_timeout_ms). */
KEEL_EXTERN int keel_redis_eval_timeout(keel_redis *r, uint64_t timeout_ms,
                                        const keel_redis_script *s, int nkeys, int argc,
                                        const char *const *argv, const size_t *argvlen,
                                        keel_redis_reply_cb cb, void *data);

/* ---- state, stats, close ----------------------------------------------- */

/* Current state (KEEL_REDIS_DOWN for NULL). Loop thread only. */
KEEL_EXTERN keel_redis_state keel_redis_get_state(const keel_redis *r);

/* Text of the last error this client saw ("" when none; a Redis error reply,
 * hiredis's connection error, or keel's reason). Valid until the next call
 * on r. "" for NULL. Loop thread only. */
KEEL_EXTERN const char *keel_redis_last_error(const keel_redis *r);

/* The loop r runs on (NULL for NULL). Loop thread only. */
KEEL_EXTERN uv_loop_t *keel_redis_loop(const keel_redis *r);

typedef struct keel_redis_stats {
  uint64_t commands;            /* counter: commands answered (any status; evals included,
                                   AUTH / SELECT / SCRIPT LOAD sent by keel not) */
  uint64_t errors;              /* counter: commands that got KEEL_EREDIS */
  uint64_t timeouts;            /* counter: commands that got UV_ETIMEDOUT */
  uint64_t in_doubt;            /* counter: commands that got KEEL_EINDOUBT */
  uint64_t noscript;            /* counter: NOSCRIPT replies answered by EVAL + reload */
  uint64_t connects;            /* counter: connections that became READY */
  uint64_t reconnects;          /* counter: connect attempts after the first */
  uint64_t disconnects;         /* counter: READY connections lost or reset */
  uint64_t pending;             /* gauge: commands waiting or in flight */
  uint64_t in_flight;           /* gauge: commands sent, reply not yet in */
  uint64_t latency_count;       /* counter: replies timed (status 0 or KEEL_EREDIS) */
  double latency_p50_us;        /* gauge: from send to reply, over all timed replies */
  double latency_p99_us;        /* gauge */
  double latency_max_us;        /* gauge */
  uint64_t latency_buckets[24]; /* counter: replies with latency < 2^i us
                                   (i = 0..22), the last one >= 2^22 us */
  uint64_t reserved_[8];        /* ABI room: filled with zero */
} keel_redis_stats;

/* Fills *out (reserved_ with zero). Does nothing when r or out is NULL.
 * Loop thread only. */
KEEL_EXTERN void keel_redis_get_stats(const keel_redis *r, keel_redis_stats *out);

struct keel_serve;

/*
 * Shows r on the keel_serve server s under name (keel/serve.h), as kind
 * "redis". The registration is dropped from s when r's close begins;
 * closing s first is safe too. Returns 0, UV_EINVAL (NULL argument, bad
 * name), KEEL_ECONFLICT (name taken for this kind), UV_ENOMEM or
 * KEEL_ECLOSING (s or the object closing). Loop thread only.
 */
KEEL_EXTERN int keel_redis_serve(struct keel_serve *s, keel_redis *r, const char *name);

/*
 * Closes the client: its connections are dropped, then on a later loop
 * iteration every pending command gets UV_ECANCELED (a command already
 * sent may have run), every lock of this client that is waiting or held
 * ends (see keel_redis_lock_acquire()), every subscription gets
 * KEEL_REDIS_SUB_ENDED (UV_ECANCELED, or 0 when already unsubscribed), and
 * last cb (may be NULL; its
 * object argument is the freed r, for identity only). No callback runs
 * during this call; on_state is not called after it; after cb,
 * uv_loop_close() succeeds. Calls on r made from those callbacks return
 * KEEL_ECLOSING. NULL-safe; a second call does nothing; callable from
 * inside any callback of r or of its locks (r stays valid until that
 * callback returns). Never fails. Loop thread only.
 */
KEEL_EXTERN void keel_redis_close(keel_redis *r, keel_close_cb cb, void *data);

/* ---- publish / subscribe --------------------------------------------------- */

/*
 * Pub/sub runs on a second connection of the client, the subscriber
 * connection: opened at the first subscription (same URL, AUTH, timeouts
 * and reconnect backoff as the command connection; no SELECT: channels are
 * not per database), kept until keel_redis_close(), driven by the same
 * loop. After it is lost keel reconnects and subscribes again to every
 * channel and pattern still wanted. Redis pub/sub delivers at most once: a
 * message published while the subscriber connection is down is lost, so a
 * subscriber that keeps state re-reads it at each KEEL_REDIS_SUB_READY.
 * Publishing is an ordinary command on the client (PUBLISH channel
 * message, or redis.call('PUBLISH', ...) in a script).
 *
 *     static void on_event(keel_redis_sub *sub, keel_redis_sub_event ev, int status,
 *                          const keel_redis_message *m, void *data) {
 *       if (ev == KEEL_REDIS_SUB_MESSAGE)
 *         printf("%.*s: %.*s\n", (int)m->channel_len, m->channel,
 *                (int)m->payload_len, m->payload);
 *       else if (ev == KEEL_REDIS_SUB_READY) reload_state(data);   // (re)subscribed
 *     }
 *     keel_redis_sub *sub;
 *     keel_redis_subscribe(r, "orders", 6, false, on_event, ctx, &sub);
 *     ...
 *     keel_redis_unsubscribe(sub);      // on_event gets KEEL_REDIS_SUB_ENDED later
 */
typedef struct keel_redis_sub keel_redis_sub;

/* Most subscriptions a client holds at once (beyond: UV_ENOBUFS). */
#define KEEL_REDIS_MAX_SUBSCRIPTIONS 4096u

typedef enum keel_redis_sub_event {
  KEEL_REDIS_SUB_MESSAGE = 0, /* a message; status 0, msg set */
  KEEL_REDIS_SUB_READY = 1,   /* the server confirmed the subscription (first time,
                                 and again after every reconnect): messages
                                 published from now on arrive; status 0 */
  KEEL_REDIS_SUB_LOST = 2,    /* the subscriber connection was lost or could not
                                 be made (status KEEL_ECONN, UV_ETIMEDOUT,
                                 KEEL_EAUTH, UV_ENOMEM; text in
                                 keel_redis_last_error()):
                                 messages are missed until the next READY; once
                                 per loss */
  KEEL_REDIS_SUB_ENDED = 3    /* the last call for this subscription, then it is
                                 freed: status 0 after keel_redis_unsubscribe(),
                                 UV_ECANCELED when the client closed, KEEL_ECONN
                                 when the subscriber connection failed for good
                                 (opts.reconnect false) */
} keel_redis_sub_event;

/* A message, valid only during the callback (copy what you keep). The
 * strings are binary-safe (use the lengths) and NUL-terminated. */
typedef struct keel_redis_message {
  const char *channel; /* the channel it was published on */
  size_t channel_len;
  const char *pattern; /* the pattern it matched (psubscribe); NULL otherwise */
  size_t pattern_len;
  const char *payload;
  size_t payload_len;
} keel_redis_message;

/*
 * Called for each event of a subscription, always on a later loop iteration
 * than the call that caused it; msg is NULL for all but MESSAGE. The order
 * per subscription: READY before any MESSAGE, LOST and READY alternating
 * with reconnects, ENDED exactly once and last. keel_redis_unsubscribe(),
 * keel_redis_subscribe() and keel_redis_close() may be called from inside.
 */
typedef void (*keel_redis_sub_cb)(keel_redis_sub *sub, keel_redis_sub_event event, int status,
                                  const keel_redis_message *msg, void *data);

/*
 * Subscribes to channel (len bytes, binary-safe, 1..1024, copied) with
 * SUBSCRIBE, or with pattern true to the glob-style pattern with
 * PSUBSCRIBE. Any number of subscriptions may share a channel (one
 * SUBSCRIBE on the wire; each gets every message). cb (required) gets
 * READY once the server confirmed, then the messages, until ENDED. *out is
 * set before any callback and stays valid until the ENDED callback returns.
 * Returns 0; or, with cb never called and *out untouched: UV_EINVAL (NULL
 * r, channel, cb or out, len 0 or > 1024), UV_ENOBUFS
 * (KEEL_REDIS_MAX_SUBSCRIPTIONS already held), KEEL_ECONN (the subscriber
 * connection failed for good: opts.reconnect false), KEEL_ECLOSING,
 * UV_ENOMEM. Loop thread only.
 */
KEEL_EXTERN int keel_redis_subscribe(keel_redis *r, const char *channel, size_t len, bool pattern,
                                     keel_redis_sub_cb cb, void *data, keel_redis_sub **out);

/*
 * Ends a subscription: no MESSAGE reaches it after this returns; ENDED
 * (status 0) comes on a later loop iteration, after which sub is freed.
 * UNSUBSCRIBE (PUNSUBSCRIBE) is sent when no other subscription of the
 * client wants the channel. Returns 0, or UV_EINVAL (NULL, or already
 * ended / ending) with nothing changed. Callable from inside its own
 * callback. Loop thread only.
 */
KEEL_EXTERN int keel_redis_unsubscribe(keel_redis_sub *sub);

typedef struct keel_redis_pubsub_stats {
  uint64_t subscriptions; /* gauge: subscriptions held (not yet ended) */
  uint64_t channels;      /* gauge: channels and patterns the server confirmed
                             on the current subscriber connection */
  uint64_t messages;      /* counter: messages received */
  uint64_t deliveries;    /* counter: MESSAGE callbacks run (a message counts
                             once per subscription that got it) */
  uint64_t dropped;       /* counter: messages no subscription wanted any more
                             (arrived between unsubscribe and UNSUBSCRIBE) */
  uint64_t connects;      /* counter: subscriber connections made (AUTH done) */
  uint64_t disconnects;   /* counter: subscriber connections lost */
  uint64_t resubscribes;  /* counter: SUBSCRIBE / PSUBSCRIBE sent again after a
                             reconnect (one per channel or pattern) */
  bool connected;         /* gauge: the subscriber connection is up */
  uint64_t reserved_[8];  /* ABI room: filled with zero */
} keel_redis_pubsub_stats;

/* Fills *out (all zero before the first subscription; reserved_ with
 * zero). Does nothing when r or out is NULL. Loop thread only. */
KEEL_EXTERN void keel_redis_get_pubsub_stats(const keel_redis *r, keel_redis_pubsub_stats *out);

/* ---- distributed locks ------------------------------------------------- */

typedef struct keel_redis_lock keel_redis_lock;

/*
 * Called once per acquire, on a later loop iteration. status:
 *   0              granted: keel_redis_lock_fence() and the others are set;
 *                  end it with keel_redis_lock_release();
 *   KEEL_EBUSY     held by someone else (after wait_ms when set);
 *   UV_ETIMEDOUT, KEEL_EINDOUBT, KEEL_ECONN, KEEL_EREDIS: the client's
 *                  errors (a lock that may have been taken in doubt is
 *                  released by keel in the background when it can be);
 *   UV_ECANCELED   keel_redis_lock_cancel() or keel_redis_close().
 * When status != 0 the lock object is freed after this callback returns.
 */
typedef void (*keel_redis_lock_cb)(keel_redis_lock *lock, int status, void *data);

/*
 * Called at most once per lock, when the watchdog fails to renew it:
 * KEEL_ELOST (the key expired or holds another token: someone else may hold
 * it now) or a client error (UV_ETIMEDOUT, KEEL_EINDOUBT, KEEL_ECONN, ...:
 * the lock may expire before keel can renew it). It comes no later than
 * the validity end (keel_redis_lock_valid_until()): a renewal unanswered
 * then is abandoned with UV_ETIMEDOUT (a late success of it is released in
 * the background). The watchdog stops; the
 * lock object stays valid and must still be ended with
 * keel_redis_lock_release(). Stop writing under this lock at once.
 */
typedef void (*keel_redis_lock_lost_cb)(keel_redis_lock *lock, int status, void *data);

typedef struct keel_redis_lock_opts {
  uint64_t ttl_ms;                 /* validity of the key; default 10000, >= 10 */
  uint64_t wait_ms;                /* 0 (default): KEEL_EBUSY at once when held;
                                      otherwise retry until this much time has passed */
  keel_backoff retry_backoff;      /* delay between tries while waiting: default
                                      full jitter 10 ms x2, cap 200 ms */
  bool watchdog;                   /* default false: renew every ttl/3 while held */
  uint32_t max_renewals;           /* watchdog cap (0 = unlimited); after it the lock
                                      simply expires at its validity end */
  keel_redis_lock_lost_cb on_lost; /* may be NULL */
  void *lost_data;                 /* passed to on_lost */
  const char *prefix;              /* key prefix, copied; default "keel:lock:".
                                      The lock key is <prefix>{<name>} and the fence
                                      counter <prefix>{<name>}:fence (one cluster slot) */
  uint64_t server_timeout_ms;      /* per-command timeout of the lock's scripts;
                                      0 (default): min(client's, ttl / 10, >= 5 ms)
                                      for Redlock, the client's otherwise */
  uint64_t reserved_[8];           /* ABI room: zero (opts_init does); never set */
} keel_redis_lock_opts;

/* Zeroes *opts (reserved_ included) and fills the defaults above.
 * NULL-safe. Thread-safe. */
KEEL_EXTERN void keel_redis_lock_opts_init(keel_redis_lock_opts *opts);

/*
 * Tries to take lock `name` (binary-safe up to 1024 bytes, copied) on r for
 * opts->ttl_ms (opts NULL: the defaults). One script does SET key token NX
 * PX ttl and, when it succeeded, INCR of the fence counter, atomically; the
 * token is 16 bytes from the OS's random source. cb is called once (see
 * keel_redis_lock_cb). *out is set before any callback and stays valid
 * until the acquire failed (after cb) or the lock was released (after the
 * release callback) or the client's close callback ran.
 * Returns 0; or, with cb never called and *out untouched: UV_EINVAL (NULL
 * r, name, cb or out, empty or too long name, ttl_ms < 10, bad backoff),
 * KEEL_ECLOSING, KEEL_ECONN (client DOWN for good), UV_ENOMEM; or
 * UV_ENOBUFS from the client. Loop thread only.
 */
KEEL_EXTERN int keel_redis_lock_acquire(keel_redis *r, const char *name,
                                        const keel_redis_lock_opts *opts, keel_redis_lock_cb cb,
                                        void *data, keel_redis_lock **out);

/*
 * Redlock: takes lock `name` on n independent servers in parallel (each
 * with a small per-server timeout); granted when a majority (n/2 + 1)
 * granted it within validity = ttl − elapsed − drift (drift = ttl/100 +
 * 2 ms) > 0; otherwise released on every server and retried (wait_ms) or
 * refused with KEEL_EBUSY (held elsewhere) or the first client error seen
 * when too few servers answered. The fence is the largest of the granted
 * servers' counters (see docs/redis.md for what that does and does not
 * guarantee). servers[] is copied (the clients themselves are not owned and
 * must outlive the lock); n in 1..16; all on one loop. Returns as
 * keel_redis_lock_acquire(), plus UV_EINVAL for a bad n or a NULL server.
 * Loop thread only.
 */
KEEL_EXTERN int keel_redis_redlock_acquire(keel_redis *const *servers, unsigned n, const char *name,
                                           const keel_redis_lock_opts *opts, keel_redis_lock_cb cb,
                                           void *data, keel_redis_lock **out);

/*
 * Called once per release or extend, on a later loop iteration. Release:
 * 0 (deleted by us), KEEL_ELOST (it had expired, or another token holds it
 * now: nothing deleted), or a client error (UV_ETIMEDOUT, KEEL_EINDOUBT,
 * KEEL_ECONN, KEEL_EREDIS: it expires at its validity end), UV_ECANCELED
 * (client closing). After a release callback the lock object is freed.
 * Extend: 0 (new validity set), KEEL_ELOST, or a client error; the lock
 * object stays valid.
 */
typedef void (*keel_redis_lock_done_cb)(keel_redis_lock *lock, int status, void *data);

/*
 * Releases a granted lock (compare-and-delete script: deletes the key only
 * if it still holds our token; a key that holds another owner's token is
 * left alone). Stops the watchdog. Callable after on_lost (it then reports
 * KEEL_ELOST, or 0 if the key was still ours). cb may be NULL (the object
 * is still freed after the outcome). Returns 0; or, nothing done and the
 * lock still held: UV_EINVAL (NULL lock, not granted yet: use
 * keel_redis_lock_cancel(); release already called; a keel_redis_lock_extend()
 * still in progress), KEEL_ECLOSING, UV_ENOMEM, UV_ENOBUFS (call again).
 * Loop thread only.
 */
KEEL_EXTERN int keel_redis_lock_release(keel_redis_lock *lock, keel_redis_lock_done_cb cb,
                                        void *data);

/*
 * Extends a granted lock to ttl_ms from now (compare-and-pexpire script; 0
 * = the lock's ttl; else >= 10). On success the validity end moves. A
 * watchdog renewal in flight is superseded (the watchdog goes on). Returns
 * as keel_redis_lock_release() (the object stays valid; UV_EINVAL also
 * while another keel_redis_lock_extend() or the release is in progress).
 * Loop thread only.
 */
KEEL_EXTERN int keel_redis_lock_extend(keel_redis_lock *lock, uint64_t ttl_ms,
                                       keel_redis_lock_done_cb cb, void *data);

/*
 * Cancels an acquire still in progress (waiting or in flight): its callback
 * gets UV_ECANCELED on a later iteration; a lock that the server granted
 * meanwhile is released in the background. Returns 0; UV_EINVAL (NULL,
 * already granted or already ended); or KEEL_ECLOSING when
 * keel_redis_close() began on the lock's client (nothing changes: the close
 * ends the acquire with UV_ECANCELED, once). Loop thread only.
 */
KEEL_EXTERN int keel_redis_lock_cancel(keel_redis_lock *lock);

/* The fencing token of a granted lock: strictly increasing per name on one
 * server (0 before granted, for NULL). Loop thread only. */
KEEL_EXTERN uint64_t keel_redis_lock_fence(const keel_redis_lock *lock);

/* The lock's random token as 32 lower-case hex digits (static storage of
 * the lock, valid as long as it; "" for NULL). Loop thread only. */
KEEL_EXTERN const char *keel_redis_lock_token(const keel_redis_lock *lock);

/* End of validity in uv_now() milliseconds of the loop (0 before granted or
 * for NULL): do not rely on the lock after it. Loop thread only. */
KEEL_EXTERN uint64_t keel_redis_lock_valid_until(const keel_redis_lock *lock);

/* Number of watchdog renewals so far (0 for NULL). Loop thread only. */
KEEL_EXTERN uint64_t keel_redis_lock_renewals(const keel_redis_lock *lock);

/* During a release callback with KEEL_ELOST: true when the key held another
 * owner's token (someone else holds the lock now), false when it had
 * expired with no new owner. false otherwise and for NULL. Loop thread
 * only. */
KEEL_EXTERN bool keel_redis_lock_taken_by_other(const keel_redis_lock *lock);

#ifdef __cplusplus
}
#endif
#endif /* KEEL_REDIS_H */
