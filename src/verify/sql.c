/* SQL text of the verifier: keyset batches, bound, leader lock, checkpoint.
 * Identifiers are always quoted with keel_pg_quote_ident(), never pasted. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "verify/verify_internal.h"

typedef struct sb {
  char *p;
  size_t len, cap;
  bool oom;
} sb;

static void sb_addn(sb *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = keel__realloc(b->p, cap);
    if (p == NULL) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_add(sb *b, const char *s) {
  sb_addn(b, s, strlen(s));
}

static void sb_int(sb *b, long long v) {
  char tmp[32];
  int n = snprintf(tmp, sizeof tmp, "%lld", v);
  sb_addn(b, tmp, (size_t)n);
}

/* $first, $first+1, ... (n params) */
static void sb_params(sb *b, int first, int n) {
  for (int i = 0; i < n; i++) {
    if (i) sb_add(b, ", ");
    sb_add(b, "$");
    sb_int(b, first + i);
  }
}

static char *sb_take(sb *b) {
  if (b->oom) {
    keel__free(b->p);
    b->p = NULL;
    return NULL;
  }
  char *p = b->p;
  b->p = NULL;
  b->len = b->cap = 0;
  return p;
}

/* Quoted identifiers, kept for building. */
typedef struct qnames {
  char table[140];
  char keys[KEEL_VERIFY_MAX_KEYS][140];
  char ckpt[140];
  char lease[140];
  int nkeys;
} qnames;

/* The lease is held by $first (name), $first+1 (owner) with fence $first+2,
 * unexpired by the server's clock; the row stays locked FOR SHARE until
 * the statement's transaction ends, so a takeover waits for it. */
static void fence_select(sb *b, const qnames *q, int first) {
  sb_add(b, "SELECT 1 FROM ");
  sb_add(b, q->lease);
  sb_add(b, " l WHERE l.name = $");
  sb_int(b, first);
  sb_add(b, " AND l.owner = $");
  sb_int(b, first + 1);
  sb_add(b, " AND l.fence = $");
  sb_int(b, first + 2);
  sb_add(b, "::bigint AND l.expires_at > pg_catalog.clock_timestamp() FOR SHARE");
}

static void key_list(sb *b, const qnames *q, const char *suffix) {
  for (int i = 0; i < q->nkeys; i++) {
    if (i) sb_add(b, ", ");
    sb_add(b, q->keys[i]);
    if (suffix) sb_add(b, suffix);
  }
}

/* "(k1, k2)" or "k1" */
static void key_tuple(sb *b, const qnames *q) {
  if (q->nkeys > 1) sb_add(b, "(");
  key_list(b, q, NULL);
  if (q->nkeys > 1) sb_add(b, ")");
}

static void param_tuple(sb *b, const qnames *q, int first) {
  if (q->nkeys > 1) sb_add(b, "(");
  sb_params(b, first, q->nkeys);
  if (q->nkeys > 1) sb_add(b, ")");
}

static bool in_list(const char *const *cols, const char *name) {
  for (int i = 0; cols[i] != NULL; i++)
    if (strcmp(cols[i], name) == 0) return true;
  return false;
}

static int build_batch(sb *b, const keel_verify_opts *o, const qnames *q, bool next,
                       const char **why) {
  sb_add(b, "SELECT ");
  if (o->columns == NULL) {
    sb_add(b, "*");
  } else {
    char tmp[140];
    int n = 0;
    for (int i = 0; o->columns[i] != NULL; i++, n++) {
      if (keel_pg_quote_ident(tmp, sizeof tmp, o->columns[i], false) < 0) {
        *why = "a column name is not a valid identifier";
        return UV_EINVAL;
      }
      if (n) sb_add(b, ", ");
      sb_add(b, tmp);
    }
    for (int k = 0; k < q->nkeys; k++) {
      if (in_list(o->columns, o->id_columns[k])) continue;
      if (n++) sb_add(b, ", ");
      sb_add(b, q->keys[k]);
    }
  }
  sb_add(b, " FROM ");
  sb_add(b, q->table);
  const char *and = " WHERE ";
  int p = 1;
  if (next) {
    sb_add(b, and);
    key_tuple(b, q);
    sb_add(b, " > ");
    param_tuple(b, q, p);
    p += q->nkeys;
    and = " AND ";
  }
  if (o->bound_run) {
    sb_add(b, and);
    key_tuple(b, q);
    sb_add(b, " <= ");
    param_tuple(b, q, p);
    and = " AND ";
  }
  if (o->where != NULL && o->where[0] != '\0') {
    sb_add(b, and);
    sb_add(b, "(");
    sb_add(b, o->where);
    sb_add(b, ")");
  }
  sb_add(b, " ORDER BY ");
  key_list(b, q, NULL);
  sb_add(b, " LIMIT ");
  sb_int(b, (long long)o->batch_size);
  return 0;
}

int64_t keel__verify_lock_key(const char *table) {
  uint64_t h = 14695981039346656037ULL;
  const char *pre = "keel_verify:";
  for (const char *s = pre; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
  for (const char *s = table; s && *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
  h &= 0x7fffffffffffffffULL;
  if (h == 0) h = 1;
  return (int64_t)h;
}

void keel__vsql_free(keel__vsql *s) {
  keel__free(s->batch_first);
  keel__free(s->batch_next);
  keel__free(s->max_key);
  keel__free(s->lock);
  keel__free(s->ckpt_create);
  keel__free(s->ckpt_load);
  keel__free(s->ckpt_save);
  keel__free(s->ckpt_clear);
  keel__free(s->lease_create);
  keel__free(s->lease_acquire);
  keel__free(s->lease_release);
  keel__free(s->lease_check);
  memset(s, 0, sizeof *s);
}

int keel__vsql_build(keel__vsql *s, const keel_verify_opts *o, const char **why) {
  static const char *dummy;
  if (why == NULL) why = &dummy;
  memset(s, 0, sizeof *s);
  qnames q;
  memset(&q, 0, sizeof q);
  if (o->table == NULL || keel_pg_quote_ident(q.table, sizeof q.table, o->table, true) < 0) {
    *why = "table is not a valid identifier";
    return UV_EINVAL;
  }
  for (int k = 0; k < KEEL_VERIFY_MAX_KEYS && o->id_columns[k] != NULL; k++) {
    if (keel_pg_quote_ident(q.keys[k], sizeof q.keys[k], o->id_columns[k], false) < 0) {
      *why = "an id column is not a valid identifier";
      return UV_EINVAL;
    }
    q.nkeys++;
  }
  if (q.nkeys == 0) {
    *why = "id_columns is empty";
    return UV_EINVAL;
  }
  if (o->checkpoint_table != NULL &&
      keel_pg_quote_ident(q.ckpt, sizeof q.ckpt, o->checkpoint_table, true) < 0) {
    *why = "checkpoint_table is not a valid identifier";
    return UV_EINVAL;
  }
  bool lease = o->leader_lock && o->leader_kind == KEEL_VERIFY_LEADER_LEASE;
  if (lease &&
      keel_pg_quote_ident(q.lease, sizeof q.lease,
                          o->leader_table ? o->leader_table : KEEL_VERIFY_DEFAULT_LEADER_TABLE,
                          true) < 0) {
    *why = "leader_table is not a valid identifier";
    return UV_EINVAL;
  }
  s->nkeys = q.nkeys;
  s->bounded = o->bound_run;
  sb b = {0};
  int rc;
  if ((rc = build_batch(&b, o, &q, false, why)) < 0) goto fail;
  s->batch_first = sb_take(&b);
  if ((rc = build_batch(&b, o, &q, true, why)) < 0) goto fail;
  s->batch_next = sb_take(&b);

  sb_add(&b, "SELECT ");
  key_list(&b, &q, NULL);
  sb_add(&b, " FROM ");
  sb_add(&b, q.table);
  if (o->where != NULL && o->where[0] != '\0') {
    sb_add(&b, " WHERE (");
    sb_add(&b, o->where);
    sb_add(&b, ")");
  }
  sb_add(&b, " ORDER BY ");
  key_list(&b, &q, " DESC");
  sb_add(&b, " LIMIT 1");
  s->max_key = sb_take(&b);

  /* Held already on this session? Then true without stacking the lock;
   * otherwise try to take it. CASE evaluates in order. */
  sb_add(&b,
         "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = "
         "'advisory' AND pid = pg_catalog.pg_backend_pid() AND granted AND objsubid = 1 AND "
         "classid::bigint = (($1::bigint >> 32) & 4294967295) AND objid::bigint = "
         "($1::bigint & 4294967295)) THEN true ELSE pg_catalog.pg_try_advisory_lock($1::bigint) "
         "END");
  s->lock = sb_take(&b);

  if (o->checkpoint_table != NULL) {
    sb_add(&b, "CREATE TABLE IF NOT EXISTS ");
    sb_add(&b, q.ckpt);
    sb_add(&b,
           " (job text PRIMARY KEY, last_key text[], updated_at timestamptz NOT NULL "
           "DEFAULT now())");
    s->ckpt_create = sb_take(&b);

    sb_add(&b, "SELECT ");
    for (int k = 0; k < q.nkeys; k++) {
      if (k) sb_add(&b, ", ");
      sb_add(&b, "last_key[");
      sb_int(&b, k + 1);
      sb_add(&b, "]");
    }
    sb_add(&b, " FROM ");
    sb_add(&b, q.ckpt);
    sb_add(&b, " WHERE job = $1 AND last_key IS NOT NULL");
    s->ckpt_load = sb_take(&b);

    if (lease) { /* fenced: written only while the lease is held; returns held */
      sb_add(&b, "WITH f AS (");
      fence_select(&b, &q, q.nkeys + 2);
      sb_add(&b, "), w AS (");
    }
    sb_add(&b, "INSERT INTO ");
    sb_add(&b, q.ckpt);
    sb_add(&b, lease ? " (job, last_key, updated_at) SELECT $1, ARRAY["
                     : " (job, last_key, updated_at) VALUES ($1, ARRAY[");
    for (int k = 0; k < q.nkeys; k++) {
      if (k) sb_add(&b, ", ");
      sb_add(&b, "$");
      sb_int(&b, k + 2);
      sb_add(&b, "::text");
    }
    sb_add(&b, lease ? "], now() FROM f" : "], now())");
    sb_add(&b,
           " ON CONFLICT (job) DO UPDATE SET last_key = EXCLUDED.last_key, "
           "updated_at = EXCLUDED.updated_at");
    if (lease) sb_add(&b, ") SELECT EXISTS (SELECT 1 FROM f)");
    s->ckpt_save = sb_take(&b);

    if (lease) {
      sb_add(&b, "WITH f AS (");
      fence_select(&b, &q, 2);
      sb_add(&b, "), w AS (");
    }
    sb_add(&b, "UPDATE ");
    sb_add(&b, q.ckpt);
    sb_add(&b, " SET last_key = NULL, updated_at = now() WHERE job = $1");
    if (lease) sb_add(&b, " AND EXISTS (SELECT 1 FROM f)) SELECT EXISTS (SELECT 1 FROM f)");
    s->ckpt_clear = sb_take(&b);
  }

  if (lease) {
    sb_add(&b, "CREATE TABLE IF NOT EXISTS ");
    sb_add(&b, q.lease);
    sb_add(&b,
           " (name text PRIMARY KEY, owner text NOT NULL, fence bigint NOT NULL, "
           "expires_at timestamptz NOT NULL, elected_at timestamptz NOT NULL)");
    s->lease_create = sb_take(&b);

    /* Taken when free or expired (the fence goes up: a takeover), renewed
     * by its owner while unexpired (same fence). An owner whose lease
     * expired gets a new fence too: its writes of before stay refused. */
    static const char *const same =
        "l.owner = EXCLUDED.owner AND l.expires_at > pg_catalog.clock_timestamp()";
    sb_add(&b, "INSERT INTO ");
    sb_add(&b, q.lease);
    sb_add(&b,
           " AS l (name, owner, fence, expires_at, elected_at) VALUES ($1, $2, 1, "
           "pg_catalog.clock_timestamp() + $3::bigint * interval '1 millisecond', "
           "pg_catalog.clock_timestamp()) ON CONFLICT (name) DO UPDATE SET fence = CASE WHEN ");
    sb_add(&b, same);
    sb_add(&b, " THEN l.fence ELSE l.fence + 1 END, elected_at = CASE WHEN ");
    sb_add(&b, same);
    sb_add(&b,
           " THEN l.elected_at ELSE EXCLUDED.elected_at END, owner = EXCLUDED.owner, "
           "expires_at = EXCLUDED.expires_at WHERE l.owner = EXCLUDED.owner OR l.expires_at <= "
           "pg_catalog.clock_timestamp() RETURNING l.fence");
    s->lease_acquire = sb_take(&b);

    sb_add(&b, "UPDATE ");
    sb_add(&b, q.lease);
    sb_add(&b,
           " SET expires_at = pg_catalog.clock_timestamp() WHERE name = $1 AND owner = $2 AND "
           "fence = $3::bigint AND expires_at > pg_catalog.clock_timestamp()");
    s->lease_release = sb_take(&b);

    sb_add(&b, "SELECT EXISTS (");
    fence_select(&b, &q, 1);
    sb_add(&b, ")");
    s->lease_check = sb_take(&b);
  }
  if (s->batch_first == NULL || s->batch_next == NULL || s->max_key == NULL || s->lock == NULL ||
      (o->checkpoint_table != NULL && (s->ckpt_create == NULL || s->ckpt_load == NULL ||
                                       s->ckpt_save == NULL || s->ckpt_clear == NULL)) ||
      (lease && (s->lease_create == NULL || s->lease_acquire == NULL || s->lease_release == NULL ||
                 s->lease_check == NULL))) {
    *why = "out of memory";
    rc = UV_ENOMEM;
    goto fail;
  }
  return 0;
fail:
  keel__free(b.p);
  keel__vsql_free(s);
  return rc;
}
