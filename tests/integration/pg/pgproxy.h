/* A PostgreSQL wire-protocol proxy for tests, on the test's own uv loop:
 * it forwards bytes between keel and the throwaway server and cuts the
 * connection at a chosen point of the server's reply stream (before or
 * after a CommandComplete with a given tag), so that "the reply arrived but
 * not the sync" and "the statement ran but its reply was lost" can be
 * produced exactly, every run. */
#ifndef KEEL_TEST_PGPROXY_H
#define KEEL_TEST_PGPROXY_H

#include <stdbool.h>
#include <stddef.h>
#include <uv.h>

typedef struct pgproxy pgproxy;

/* Starts listening on 127.0.0.1 (ephemeral port) and forwarding to the
 * server of conninfo (TCP host and port). Writes into out a conninfo that
 * goes through the proxy (sslmode and gssencmode disabled). */
pgproxy *pgproxy_start(uv_loop_t *loop, const char *conninfo, char *out, size_t cap);

/* Arms one cut: at the next server message CommandComplete whose tag starts
 * with tag ("COMMIT", "INSERT"), after forwarding it (after = true) or
 * without forwarding it (after = false), both sockets are closed. */
void pgproxy_cut_at(pgproxy *p, const char *tag, bool after);

/* While on, NotificationResponse messages from the server are dropped (a
 * proxy that lost LISTEN): every other message still goes through. */
void pgproxy_drop_notifications(pgproxy *p, bool on);

/* From now on, nothing the server sends on the connections open now
 * reaches their clients, and their sockets stay open: a server that stopped
 * answering, or a proxy holding a dead server connection. Connections made
 * later go through as usual. */
void pgproxy_silence_open_connections(pgproxy *p);

/* Notifications dropped so far. */
int pgproxy_dropped(const pgproxy *p);

/* Cuts that happened so far. */
int pgproxy_cuts(const pgproxy *p);

/* Closes the listener and every connection (the loop must then run to
 * finish the closes); frees p once they are closed. */
void pgproxy_stop(pgproxy *p);

#endif
