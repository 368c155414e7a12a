/* Private to src/serve: the stats writer (Prometheus text or JSON over one
 * set of calls) and the byte buffer both render into. */
#ifndef KEEL_SERVE_INTERNAL_H
#define KEEL_SERVE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/stats_hook.h"
#include "keel/serve.h"

/* A growable byte buffer; `failed` sticks after an allocation failure.
 * Buffers are kept and reused (len = 0) rather than freed: on a VM a page
 * fault on fresh memory costs tens of microseconds. */
typedef struct keel__buf {
  char *data;
  size_t len;
  size_t cap;
  bool failed;
} keel__buf;

/* Room for n more bytes (plus a NUL); NULL (and failed) when it cannot. */
char *keel__buf_room(keel__buf *b, size_t n);
void keel__buf_put(keel__buf *b, const void *p, size_t n);
void keel__buf_puts(keel__buf *b, const char *s);
void keel__buf_u64(keel__buf *b, uint64_t v);
void keel__buf_free(keel__buf *b);
/* Appends s escaped as a Prometheus label value (\\, \", \n). */
void keel__buf_label_escape(keel__buf *b, const char *s);
/* Appends s as a JSON string (quotes included); text that is not UTF-8 is
 * written as "(not UTF-8)". */
void keel__buf_json_str(keel__buf *b, const char *s);

/* Formats v into p (at least 40 bytes): integers without a fraction,
 * decimals that round-trip exactly, NaN, +Inf, -Inf. Returns the end. */
char *keel__fmt_double(char *p, double v);
char *keel__fmt_u64(char *p, uint64_t v);

typedef enum { KEEL__W_PROM, KEEL__W_JSON } keel__wmode;

/* PROM: one family keel_<kind>_<metric>; its samples gather in `samples`
 * (kept between renders) and are concatenated at the end. */
typedef struct keel__family {
  char *name; /* keel_<kind>_<metric> (counters without _total) */
  size_t name_len;
  char *help; /* a copy of the first call's text (the caller's may be gone) */
  char type;  /* 'c' counter, 'g' gauge, 'h' histogram */
  keel__buf samples;
  const double *le_upper; /* histogram bounds whose texts are in le */
  size_t le_n;
  char (*le)[40]; /* le_n texts, then le_n doubles, then le_n lengths */
  double *le_vals;
  size_t *le_len;
} keel__family;

/* PROM: the families a kind's source reported, in call order, so that the
 * i-th call of the next object of that kind finds its family at once. */
typedef struct keel__kslot {
  const char *metric;
  size_t fam;
} keel__kslot;

typedef struct keel__kind {
  const char *kind;
  keel__kslot *slots;
  size_t n, cap;
} keel__kind;

struct keel_stats_writer {
  keel__wmode mode;
  const char *kind;
  size_t kind_len; /* strlen(kind) */
  bool failed;
  /* PROM */
  const char *label; /* the escaped name label value of the object */
  size_t label_len;
  keel__family *fams;
  size_t nfams, capfams;
  keel__kind *kinds;
  size_t nkinds, capkinds;
  size_t cur_kind; /* index into kinds, or SIZE_MAX */
  size_t call;     /* calls made for the current object */
  const char *last_metric;
  size_t last_fam;
  /* JSON */
  keel__buf *out;
  bool first;            /* no field written yet in the stats object */
  const char *by_metric; /* counter_by group open */
};

void keel__writer_init(keel_stats_writer *w, keel__wmode mode);
/* PROM: starts a render (keeps the families' buffers). */
void keel__writer_prom_reset(keel_stats_writer *w);
/* PROM: the next calls are for an object of kind with this label. */
void keel__writer_prom_object(keel_stats_writer *w, const char *kind, const char *label,
                              size_t label_len);
/* PROM: concatenates every family (HELP, TYPE, samples) into out. */
void keel__writer_prom_finish(keel_stats_writer *w, keel__buf *out);
void keel__writer_dispose(keel_stats_writer *w);

/* JSON: appends {["id":id,]"kind":…,"name":…,"stats":{…}} of obj (id 0:
 * none) or, with name NULL, the bare stats object. Returns false when an
 * allocation failed. */
bool keel__json_object(keel__buf *out, const keel_stats_source *src, const void *obj,
                       const char *name, uint64_t id);

#endif
