/* Private to src/serve: the stats writer (three modes over one set of
 * calls) and the server's registration record. */
#ifndef KEEL_SERVE_INTERNAL_H
#define KEEL_SERVE_INTERNAL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/stats_hook.h"
#include "keel/serve.h"

/* A growable byte buffer; `failed` sticks after an allocation failure. */
typedef struct keel__buf {
  char *data;
  size_t len;
  size_t cap;
  bool failed;
} keel__buf;

void keel__buf_put(keel__buf *b, const void *p, size_t n);
void keel__buf_puts(keel__buf *b, const char *s);
void keel__buf_u64(keel__buf *b, uint64_t v);
void keel__buf_double(keel__buf *b, double v); /* Prometheus float: NaN, +Inf, -Inf */
void keel__buf_free(keel__buf *b);
/* Appends s escaped as a Prometheus label value (\\, \", \n). */
void keel__buf_label_escape(keel__buf *b, const char *s);
/* Appends s escaped for a HELP line (\\, \n). */
void keel__buf_help_escape(keel__buf *b, const char *s);

#define KEEL__LE_CACHE 32

typedef enum { KEEL__W_PROM, KEEL__W_JSON, KEEL__W_HASH } keel__wmode;

typedef struct keel__family {
  char *name;       /* keel_<kind>_<metric> (counters without _total) */
  const char *help; /* the source's static text */
  char type;        /* 'c' counter, 'g' gauge, 'h' histogram */
  keel__buf samples;
} keel__family;

struct keel_stats_writer {
  keel__wmode mode;
  const char *kind;
  const char *label; /* PROM: the escaped name label value of the object */
  size_t label_len;
  bool failed;
  /* PROM */
  keel__family *fams;
  size_t nfams, capfams;
  size_t hint;
  /* JSON */
  json_t *obj;
  json_t *by_obj; /* counter_by group being filled */
  const char *by_metric;
  /* HASH */
  uint64_t hash;
  /* PROM: formatted histogram bounds of the last bounds array seen */
  const double *le_upper;
  size_t le_n;
  char le[KEEL__LE_CACHE][32];
};

void keel__writer_init(keel_stats_writer *w, keel__wmode mode);
/* PROM: concatenates every family (HELP, TYPE, samples) into out. */
void keel__writer_prom_finish(keel_stats_writer *w, keel__buf *out);
void keel__writer_dispose(keel_stats_writer *w);

#endif
