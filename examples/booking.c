/*
 * examples/booking.c — seed 002's double booking: two processes try to book
 * the same reservation slot at the same moment. Each takes a Redis lock on
 * the slot and writes the booking to PostgreSQL guarded by the lock's
 * fencing token, so that even a holder whose lock expired behind its back
 * (a pause, a slow network) cannot overwrite the winner:
 *
 *     UPDATE keel_booking_slots SET owner = $2, fence = $3
 *      WHERE id = $1 AND owner IS NULL AND fence < $3
 *
 * Exactly one process books the slot; the other is told who has it. Each
 * request carries an idempotency key (keel/idempotency.h): each process then
 * sends its request again with the same key, as a client does after a lost
 * reply, and gets the stored answer without booking or locking again.
 *
 * Run: KEEL_PG="host=... dbname=..." KEEL_REDIS="redis://127.0.0.1:6379" ./booking
 * (falling back to KEEL_TEST_PG and KEEL_TEST_REDIS="host:port"). Exits 0
 * when exactly one of the two processes booked the slot. --forever books a
 * new slot every second until Ctrl-C.
 */
#include <keel.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

enum { EXIT_WON = 10, EXIT_LOST = 11 };

typedef struct booker {
  uv_loop_t loop;
  keel_redis *redis;
  keel_pg *pg;
  keel_redis_lock *lock;
  keel_idem *idem;
  keel_idem_token token;
  bool owned; /* this request took its idempotency key */
  char key[64];
  const char *who;
  char slot[32];
  char fence[32];
  int outcome; /* EXIT_WON, EXIT_LOST or 1 (error) */
} booker;

#define SCOPE "POST /slots/booking"

static void shut_down(booker *b) {
  keel_idem_close(b->idem, NULL, NULL);
  keel_redis_close(b->redis, NULL, NULL);
  keel_pg_close(b->pg, NULL, NULL);
}

static void on_stored(keel_idem *idem, int status, void *data) {
  booker *b = data;
  if (status != 0) fprintf(stderr, "%s: %s\n", b->who, keel_idem_last_error(idem));
  shut_down(b);
}

/* Stores the answer under the request's key (or frees the key after an
 * error, so that a retry runs again), then shuts down. */
static void finish(booker *b) {
  if (b->owned && (b->outcome == EXIT_WON || b->outcome == EXIT_LOST)) {
    const char *answer = b->outcome == EXIT_WON ? "booked" : "taken";
    if (keel_idem_complete(b->idem, SCOPE, b->key, &b->token, b->outcome == EXIT_WON ? 201 : 409,
                           answer, strlen(answer), on_stored, b) == 0)
      return;
  } else if (b->owned && keel_idem_abort(b->idem, SCOPE, b->key, &b->token, on_stored, b) == 0) {
    return;
  }
  shut_down(b);
}

static void on_released(keel_redis_lock *lock, int status, void *data) {
  (void)lock;
  booker *b = data;
  if (status == KEEL_ELOST) /* expired while we worked: the fence protected the row */
    printf("%s: the lock had expired before the release\n", b->who);
  finish(b);
}

static void release_and_finish(booker *b) {
  /* The write is done: let the other process in. */
  if (keel_redis_lock_release(b->lock, on_released, b) != 0) finish(b);
}

static void on_owner(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  booker *b = data;
  if (status != 0)
    fprintf(stderr, "%s: %s\n", b->who, keel_pg_last_error(c));
  else
    printf("%s: slot %s is already booked by %s\n", b->who, b->slot,
           keel_pg_result_get(res, 0, "owner"));
  release_and_finish(b);
}

static void on_booked(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  booker *b = data;
  if (status != 0) {
    fprintf(stderr, "%s: booking failed: %s\n", b->who, keel_pg_last_error(c));
    b->outcome = 1;
  } else if (keel_pg_result_affected(res) == 1) {
    printf("%s: booked slot %s (fence %s)\n", b->who, b->slot, b->fence);
    b->outcome = EXIT_WON;
  } else {
    b->outcome = EXIT_LOST;
    const char *params[] = {b->slot};
    if (keel_pg_query(c, "SELECT owner FROM keel_booking_slots WHERE id = $1", 1, params, on_owner,
                      b) == 0)
      return;
  }
  release_and_finish(b);
}

static void on_locked(keel_redis_lock *lock, int status, void *data) {
  booker *b = data;
  if (status != 0) {
    fprintf(stderr, "%s: no lock: %s (%s)\n", b->who, keel_err_name(status),
            keel_redis_last_error(b->redis));
    b->outcome = 1;
    finish(b);
    return;
  }
  /* The fence goes into the write: a stale holder's write matches 0 rows. */
  snprintf(b->fence, sizeof b->fence, "%llu", (unsigned long long)keel_redis_lock_fence(lock));
  b->lock = lock;
  const char *params[] = {b->slot, b->who, b->fence};
  int rc = keel_pg_query(b->pg,
                         "UPDATE keel_booking_slots SET owner = $2, fence = $3 "
                         "WHERE id = $1 AND owner IS NULL AND fence < $3",
                         3, params, on_booked, b);
  if (rc != 0) {
    b->outcome = 1;
    if (keel_redis_lock_release(lock, on_released, b) != 0) finish(b);
  }
}

/* The request's idempotency key: a new request takes the lock; a repeated
 * one gets the stored answer. */
static void on_begun(keel_idem *idem, int status, const keel_idem_reply *r, void *data) {
  booker *b = data;
  if (status == 0 && r->completed) {
    printf("%s: request %s answered from its stored response: %d %.*s\n", b->who, b->key,
           r->response_status, (int)r->body_len, r->body);
    b->outcome = r->response_status == 201 ? EXIT_WON : EXIT_LOST;
    shut_down(b);
    return;
  }
  if (status != 0) {
    fprintf(stderr, "%s: %s (%s)\n", b->who, keel_err_name(status), keel_idem_last_error(idem));
    shut_down(b);
    return;
  }
  b->owned = true;
  b->token = r->token;
  keel_redis_lock_opts lo;
  keel_redis_lock_opts_init(&lo);
  lo.ttl_ms = 5000;   /* longer than the work; */
  lo.watchdog = true; /* renewed while we hold it anyway */
  lo.wait_ms = 10000; /* queue behind the other process */
  char name[64];
  snprintf(name, sizeof name, "booking:slot:%s", b->slot);
  keel_redis_lock *lock;
  if (keel_redis_lock_acquire(b->redis, name, &lo, on_locked, b, &lock) != 0) finish(b);
}

static const char *redis_url(char *buf, size_t cap) {
  const char *url = getenv("KEEL_REDIS");
  if (url != NULL) return url;
  const char *addr = getenv("KEEL_TEST_REDIS"); /* host:port */
  snprintf(buf, cap, "redis://%s", addr != NULL ? addr : "127.0.0.1:6379");
  return buf;
}

static const char *pg_conninfo(void) {
  const char *c = getenv("KEEL_PG");
  if (c == NULL) c = getenv("KEEL_TEST_PG");
  return c != NULL ? c : "dbname=postgres";
}

/* One process: book `slot` as `who`. Returns EXIT_WON, EXIT_LOST or 1. */
static int book(const char *who, long slot) {
  booker b;
  memset(&b, 0, sizeof b);
  b.who = who;
  b.outcome = 1;
  snprintf(b.slot, sizeof b.slot, "%ld", slot);
  uv_loop_init(&b.loop);
  char buf[256];
  keel_redis_opts ro;
  keel_redis_opts_init(&ro);
  ro.url = redis_url(buf, sizeof buf);
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = pg_conninfo();
  if (keel_redis_new(&b.loop, &ro, &b.redis) != 0 || keel_pg_new(&b.loop, &po, &b.pg) != 0 ||
      keel_idem_new_redis(&b.loop, b.redis, NULL, &b.idem) != 0)
    return 1;
  /* The client's Idempotency-Key for this request. */
  snprintf(b.key, sizeof b.key, "%s-books-%ld", who, slot);
  if (keel_idem_begin(b.idem, SCOPE, b.key, b.slot, on_begun, &b) != 0) shut_down(&b);
  uv_run(&b.loop, UV_RUN_DEFAULT);
  uv_loop_close(&b.loop);
  return b.outcome;
}

/* ---- set-up and the race ------------------------------------------------- */

static int setup_status = 1;

static void on_setup(keel_pg *c, int status, const keel_pg_result *res, void *data) {
  (void)res;
  (void)data;
  if (status != 0) fprintf(stderr, "setup: %s\n", keel_pg_last_error(c));
  setup_status = status;
  keel_pg_close(c, NULL, NULL);
}

static int setup(long slot) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  keel_pg_opts po;
  keel_pg_opts_init(&po);
  po.conninfo = pg_conninfo();
  keel_pg *pg;
  if (keel_pg_new(&loop, &po, &pg) != 0) return 1;
  char id[32];
  snprintf(id, sizeof id, "%ld", slot);
  const char *params[] = {id};
  keel_pg_query(pg,
                "CREATE TABLE IF NOT EXISTS keel_booking_slots "
                "(id bigint PRIMARY KEY, owner text, fence bigint NOT NULL DEFAULT 0)",
                0, NULL, NULL, NULL);
  keel_pg_query(pg,
                "INSERT INTO keel_booking_slots (id) VALUES ($1) "
                "ON CONFLICT (id) DO UPDATE SET owner = NULL",
                1, params, on_setup, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return setup_status;
}

static int race(long slot) {
  if (setup(slot) != 0) return 1;
  const char *names[2] = {"alice", "bob"};
  pid_t pids[2];
  for (int i = 0; i < 2; i++) {
    fflush(stdout);
    pids[i] = fork();
    if (pids[i] < 0) return 1;
    if (pids[i] == 0) {
      int rc = book(names[i], slot);
      /* The same request again (a client retrying after a lost reply):
       * the stored answer, the same outcome, no second booking. */
      int again = book(names[i], slot);
      fflush(stdout);
      _exit(again == rc ? rc : 1);
    }
  }
  int won = 0, lost = 0;
  const char *winner = "nobody";
  for (int i = 0; i < 2; i++) {
    int st = 0;
    waitpid(pids[i], &st, 0);
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : 1;
    if (code == EXIT_WON) {
      won++;
      winner = names[i];
    } else if (code == EXIT_LOST) {
      lost++;
    }
  }
  printf("slot %ld: %s won (%d booked, %d turned away)\n", slot, winner, won, lost);
  return won == 1 && lost == 1 ? 0 : 1;
}

int main(int argc, char **argv) {
  bool forever = argc > 1 && strcmp(argv[1], "--forever") == 0;
  long slot = (long)getpid() * 1000;
  int rc = race(slot);
  while (forever && rc == 0) {
    sleep(1);
    rc = race(++slot);
  }
  return rc;
}
