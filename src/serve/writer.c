/* The stats writer: the calls a keel_stats_source makes, rendered as
 * Prometheus text (families gathered across objects), as a jansson object,
 * or folded into a hash that tells the WebSocket which objects changed. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "serve/serve_internal.h"

/* ---- buffer ---------------------------------------------------------- */

static bool buf_reserve(keel__buf *b, size_t extra) {
  if (b->failed) return false;
  if (b->len + extra + 1 <= b->cap) return true;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra + 1) {
    if (cap > SIZE_MAX / 2) {
      b->failed = true;
      return false;
    }
    cap *= 2;
  }
  char *d = keel__realloc(b->data, cap);
  if (d == NULL) {
    b->failed = true;
    return false;
  }
  b->data = d;
  b->cap = cap;
  return true;
}

void keel__buf_put(keel__buf *b, const void *p, size_t n) {
  if (!buf_reserve(b, n)) return;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void keel__buf_puts(keel__buf *b, const char *s) {
  keel__buf_put(b, s, strlen(s));
}

void keel__buf_u64(keel__buf *b, uint64_t v) {
  char tmp[24];
  size_t i = sizeof tmp;
  do {
    tmp[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v != 0);
  keel__buf_put(b, tmp + i, sizeof tmp - i);
}

void keel__buf_double(keel__buf *b, double v) {
  if (isnan(v)) {
    keel__buf_put(b, "NaN", 3);
  } else if (isinf(v)) {
    keel__buf_puts(b, v > 0 ? "+Inf" : "-Inf");
  } else if (v >= 0 && v < 9007199254740992.0 && v == floor(v)) {
    keel__buf_u64(b, (uint64_t)v);
  } else if (v < 0 && v > -9007199254740992.0 && v == floor(v)) {
    keel__buf_put(b, "-", 1);
    keel__buf_u64(b, (uint64_t)-v);
  } else {
    char tmp[40];
    int n = snprintf(tmp, sizeof tmp, "%.17g", v);
    if (n > 0) keel__buf_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
  }
}

void keel__buf_free(keel__buf *b) {
  keel__free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
  b->failed = false;
}

void keel__buf_label_escape(keel__buf *b, const char *s) {
  const char *run = s;
  for (; *s; s++) {
    const char *rep = NULL;
    if (*s == '\\')
      rep = "\\\\";
    else if (*s == '"')
      rep = "\\\"";
    else if (*s == '\n')
      rep = "\\n";
    if (rep == NULL) continue;
    keel__buf_put(b, run, (size_t)(s - run));
    keel__buf_puts(b, rep);
    run = s + 1;
  }
  keel__buf_put(b, run, (size_t)(s - run));
}

void keel__buf_help_escape(keel__buf *b, const char *s) {
  const char *run = s;
  for (; *s; s++) {
    const char *rep = NULL;
    if (*s == '\\')
      rep = "\\\\";
    else if (*s == '\n')
      rep = "\\n";
    if (rep == NULL) continue;
    keel__buf_put(b, run, (size_t)(s - run));
    keel__buf_puts(b, rep);
    run = s + 1;
  }
  keel__buf_put(b, run, (size_t)(s - run));
}

/* ---- writer ---------------------------------------------------------- */

void keel__writer_init(keel_stats_writer *w, keel__wmode mode) {
  memset(w, 0, sizeof *w);
  w->mode = mode;
  w->hash = 1469598103934665603ull;
}

void keel__writer_dispose(keel_stats_writer *w) {
  for (size_t i = 0; i < w->nfams; i++) {
    keel__free(w->fams[i].name);
    keel__buf_free(&w->fams[i].samples);
  }
  keel__free(w->fams);
  w->fams = NULL;
  w->nfams = w->capfams = 0;
}

static void hash_bytes(keel_stats_writer *w, const void *p, size_t n) {
  const unsigned char *c = p;
  uint64_t h = w->hash;
  for (size_t i = 0; i < n; i++) {
    h ^= c[i];
    h *= 1099511628211ull;
  }
  w->hash = h;
}

static void hash_str(keel_stats_writer *w, const char *s) {
  if (s == NULL) s = "\x01";
  hash_bytes(w, s, strlen(s) + 1);
}

/* The family keel_<kind>_<metric>, created on first use. */
static keel__family *family(keel_stats_writer *w, const char *metric, const char *help, char type) {
  size_t klen = strlen(w->kind), mlen = strlen(metric);
  size_t i = w->hint;
  for (size_t tries = 0; tries < w->nfams; tries++, i++) {
    if (i >= w->nfams) i = 0;
    const char *n = w->fams[i].name;
    if (strncmp(n + 5, w->kind, klen) == 0 && n[5 + klen] == '_' &&
        strcmp(n + 6 + klen, metric) == 0) {
      w->hint = i + 1;
      return &w->fams[i];
    }
  }
  if (w->nfams == w->capfams) {
    size_t cap = w->capfams ? w->capfams * 2 : 32;
    keel__family *f = keel__realloc(w->fams, cap * sizeof *f);
    if (f == NULL) {
      w->failed = true;
      return NULL;
    }
    w->fams = f;
    w->capfams = cap;
  }
  char *name = keel__malloc(5 + klen + 1 + mlen + 1);
  if (name == NULL) {
    w->failed = true;
    return NULL;
  }
  memcpy(name, "keel_", 5);
  memcpy(name + 5, w->kind, klen);
  name[5 + klen] = '_';
  memcpy(name + 6 + klen, metric, mlen + 1);
  keel__family *f = &w->fams[w->nfams++];
  memset(f, 0, sizeof *f);
  f->name = name;
  f->help = help ? help : "";
  f->type = type;
  w->hint = w->nfams;
  return f;
}

/* Writes "<family><suffix>{name="<obj>"<extra>} " into the family. */
static void sample_head(keel_stats_writer *w, keel__family *f, const char *suffix,
                        const char *extra_label, const char *extra_value) {
  keel__buf *b = &f->samples;
  keel__buf_puts(b, f->name);
  if (suffix) keel__buf_puts(b, suffix);
  keel__buf_put(b, "{name=\"", 7);
  keel__buf_put(b, w->label, w->label_len);
  keel__buf_put(b, "\"", 1);
  if (extra_label != NULL) {
    keel__buf_put(b, ",", 1);
    keel__buf_puts(b, extra_label);
    keel__buf_put(b, "=\"", 2);
    keel__buf_label_escape(b, extra_value ? extra_value : "");
    keel__buf_put(b, "\"", 1);
  }
  keel__buf_put(b, "} ", 2);
}

static json_t *json_num(double v) {
  if (!isfinite(v)) return json_null();
  if (v == floor(v) && fabs(v) < 9007199254740992.0) return json_integer((json_int_t)v);
  return json_real(v);
}

static json_t *json_u64(uint64_t v) {
  return json_integer(v > (uint64_t)INT64_MAX ? (json_int_t)INT64_MAX : (json_int_t)v);
}

static void json_put(keel_stats_writer *w, const char *key, json_t *value) {
  if (value == NULL || json_object_set_new(w->obj, key, value) != 0) w->failed = true;
}

/* Ends a counter_by group when another call comes. */
static void end_by(keel_stats_writer *w) {
  w->by_obj = NULL;
  w->by_metric = NULL;
}

void keel_stats_counter(keel_stats_writer *w, const char *metric, const char *help,
                        uint64_t value) {
  if (w == NULL || metric == NULL) return;
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_bytes(w, &value, sizeof value);
      return;
    case KEEL__W_JSON:
      end_by(w);
      json_put(w, metric, json_u64(value));
      return;
    case KEEL__W_PROM: {
      keel__family *f = family(w, metric, help, 'c');
      if (f == NULL) return;
      sample_head(w, f, "_total", NULL, NULL);
      keel__buf_u64(&f->samples, value);
      keel__buf_put(&f->samples, "\n", 1);
      return;
    }
  }
}

void keel_stats_gauge(keel_stats_writer *w, const char *metric, const char *help, double value) {
  if (w == NULL || metric == NULL) return;
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_bytes(w, &value, sizeof value);
      return;
    case KEEL__W_JSON:
      end_by(w);
      json_put(w, metric, json_num(value));
      return;
    case KEEL__W_PROM: {
      keel__family *f = family(w, metric, help, 'g');
      if (f == NULL) return;
      sample_head(w, f, NULL, NULL, NULL);
      keel__buf_double(&f->samples, value);
      keel__buf_put(&f->samples, "\n", 1);
      return;
    }
  }
}

void keel_stats_counter_by(keel_stats_writer *w, const char *metric, const char *help,
                           const char *label, const char *label_value, uint64_t value) {
  if (w == NULL || metric == NULL || label == NULL) return;
  if (label_value == NULL) label_value = "";
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_str(w, label_value);
      hash_bytes(w, &value, sizeof value);
      return;
    case KEEL__W_JSON:
      if (w->by_metric == NULL || strcmp(w->by_metric, metric) != 0) {
        end_by(w);
        json_t *o = json_object();
        json_put(w, metric, o);
        if (o == NULL) return;
        w->by_obj = o;
        w->by_metric = metric;
      }
      if (json_object_set_new(w->by_obj, label_value, json_u64(value)) != 0) w->failed = true;
      return;
    case KEEL__W_PROM: {
      keel__family *f = family(w, metric, help, 'c');
      if (f == NULL) return;
      sample_head(w, f, "_total", label, label_value);
      keel__buf_u64(&f->samples, value);
      keel__buf_put(&f->samples, "\n", 1);
      return;
    }
  }
}

void keel_stats_state(keel_stats_writer *w, const char *metric, const char *help,
                      const char *const *names, size_t n, size_t current) {
  if (w == NULL || metric == NULL || names == NULL || n == 0) return;
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_bytes(w, &current, sizeof current);
      return;
    case KEEL__W_JSON:
      end_by(w);
      json_put(w, metric, current < n ? json_string(names[current]) : json_null());
      return;
    case KEEL__W_PROM: {
      keel__family *f = family(w, metric, help, 'g');
      if (f == NULL) return;
      for (size_t i = 0; i < n; i++) {
        sample_head(w, f, NULL, "state", names[i]);
        keel__buf_put(&f->samples, i == current ? "1\n" : "0\n", 2);
      }
      return;
    }
  }
}

static double hist_quantile(size_t n, const double *upper, const uint64_t *counts, uint64_t count,
                            double q) {
  if (count == 0) return 0;
  uint64_t rank = (uint64_t)(q * (double)count);
  if (rank >= count) rank = count - 1;
  uint64_t seen = 0;
  for (size_t i = 0; i < n; i++) {
    seen += counts[i];
    if (seen > rank) return upper[i];
  }
  return INFINITY;
}

/* The text of bound i: formatted once per bounds array (sources pass the
 * same static array every time; "%g" costs more than the rest of a line). */
static const char *le_text(keel_stats_writer *w, const double *upper, size_t n, size_t i) {
  if (w->le_upper != upper || w->le_n != n || n > KEEL__LE_CACHE) {
    w->le_upper = NULL;
    if (n > KEEL__LE_CACHE) {
      snprintf(w->le[0], sizeof w->le[0], "%g", upper[i]);
      return w->le[0];
    }
    for (size_t k = 0; k < n; k++) snprintf(w->le[k], sizeof w->le[k], "%g", upper[k]);
    w->le_upper = upper;
    w->le_n = n;
  }
  return w->le[i];
}

void keel_stats_histogram(keel_stats_writer *w, const char *metric, const char *help,
                          size_t nbuckets, const double *upper, const uint64_t *counts, double sum,
                          uint64_t count) {
  if (w == NULL || metric == NULL || (nbuckets > 0 && (upper == NULL || counts == NULL))) return;
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_bytes(w, &count, sizeof count);
      hash_bytes(w, &sum, sizeof sum);
      return;
    case KEEL__W_JSON: {
      end_by(w);
      json_t *o = json_object();
      json_put(w, metric, o);
      if (o == NULL) return;
      if (json_object_set_new(o, "count", json_u64(count)) != 0 ||
          json_object_set_new(o, "sum", json_num(sum)) != 0 ||
          json_object_set_new(o, "p50",
                              json_num(hist_quantile(nbuckets, upper, counts, count, 0.50))) != 0 ||
          json_object_set_new(o, "p99",
                              json_num(hist_quantile(nbuckets, upper, counts, count, 0.99))) != 0)
        w->failed = true;
      return;
    }
    case KEEL__W_PROM: {
      keel__family *f = family(w, metric, help, 'h');
      if (f == NULL) return;
      uint64_t cum = 0;
      for (size_t i = 0; i < nbuckets; i++) {
        cum += counts[i];
        keel__buf *b = &f->samples;
        keel__buf_puts(b, f->name);
        keel__buf_put(b, "_bucket{name=\"", 14);
        keel__buf_put(b, w->label, w->label_len);
        keel__buf_put(b, "\",le=\"", 6);
        keel__buf_puts(b, le_text(w, upper, nbuckets, i));
        keel__buf_put(b, "\"} ", 3);
        keel__buf_u64(b, cum > count ? count : cum);
        keel__buf_put(b, "\n", 1);
      }
      sample_head(w, f, "_bucket", "le", "+Inf");
      keel__buf_u64(&f->samples, count);
      keel__buf_put(&f->samples, "\n", 1);
      sample_head(w, f, "_sum", NULL, NULL);
      keel__buf_double(&f->samples, sum);
      keel__buf_put(&f->samples, "\n", 1);
      sample_head(w, f, "_count", NULL, NULL);
      keel__buf_u64(&f->samples, count);
      keel__buf_put(&f->samples, "\n", 1);
      return;
    }
  }
}

void keel_stats_text(keel_stats_writer *w, const char *key, const char *value) {
  if (w == NULL || key == NULL) return;
  switch (w->mode) {
    case KEEL__W_HASH:
      hash_str(w, value);
      return;
    case KEEL__W_JSON:
      end_by(w);
      json_t *v = value ? json_string(value) : json_null();
      if (v == NULL) v = json_string("(not UTF-8)");
      json_put(w, key, v);
      return;
    case KEEL__W_PROM:
      return;
  }
}

void keel__writer_prom_finish(keel_stats_writer *w, keel__buf *out) {
  static const char *types[] = {"counter", "gauge", "histogram"};
  for (size_t i = 0; i < w->nfams; i++) {
    keel__family *f = &w->fams[i];
    if (f->samples.failed) w->failed = true;
    if (f->samples.len == 0) continue; /* no object of that kind left */
    const char *type = f->type == 'c' ? types[0] : f->type == 'g' ? types[1] : types[2];
    size_t nlen = strlen(f->name);
    keel__buf_put(out, "# HELP ", 7);
    keel__buf_put(out, f->name, nlen);
    if (f->type == 'c') keel__buf_put(out, "_total", 6);
    keel__buf_put(out, " ", 1);
    keel__buf_help_escape(out, f->help);
    keel__buf_put(out, "\n# TYPE ", 8);
    keel__buf_put(out, f->name, nlen);
    if (f->type == 'c') keel__buf_put(out, "_total", 6);
    keel__buf_put(out, " ", 1);
    keel__buf_puts(out, type);
    keel__buf_put(out, "\n", 1);
    keel__buf_put(out, f->samples.data ? f->samples.data : "", f->samples.len);
  }
}
