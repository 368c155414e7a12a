/* keel's own statements through the pool, sent as one simple query when
 * that is cheaper (see send_literal in conn.c). Internal to keel. */
#ifndef KEEL_PG_LITERAL_H
#define KEEL_PG_LITERAL_H

#include "keel/pg.h"

/* keel_pg_pool_query_cached() for SQL that keel built: parameters appear
 * only as $n outside '...' and "..." (identifiers quoted by keel), with no
 * comments, dollar quoting or E'...' strings. On a connection that sends
 * unnamed statements (a transaction pooler) with nothing in flight, it goes
 * as one simple-protocol Query with the values as quoted literals (libpq's
 * PQescapeStringConn, for the connection's encoding); otherwise exactly as
 * keel_pg_pool_query_cached(). Same errors, same callback. Loop thread only. */
int keel__pg_pool_query_literal(keel_pg_pool *p, const char *sql, int nparams,
                                const char *const *values, keel_pg_result_cb cb, void *data);

#endif
