/* Blocking libpq helpers for the benchmarks' set-up, senders and floors:
 * any failure ends the benchmark with libpq's message. */
#ifndef KEEL_BENCH_PQ_H
#define KEEL_BENCH_PQ_H

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>

static inline PGconn *bench_pq_connect(const char *conninfo) {
  PGconn *conn = PQconnectdb(conninfo);
  if (PQstatus(conn) != CONNECTION_OK) {
    fprintf(stderr, "connect: %s", PQerrorMessage(conn));
    exit(1);
  }
  return conn;
}

static inline void bench_pq_exec(PGconn *conn, const char *sql) {
  PGresult *res = PQexec(conn, sql);
  if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
    fprintf(stderr, "%s: %s", sql, PQerrorMessage(conn));
    exit(1);
  }
  PQclear(res);
}

#endif
