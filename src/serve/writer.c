/* The stats writer: the calls a keel_stats_source makes, rendered as
 * Prometheus text (each sample appended to its family's buffer, found by
 * call position, then the families concatenated) or as JSON written
 * straight into a buffer. No allocation per object or per sample once the
 * buffers have grown; numbers are formatted by hand (snprintf only for
 * fractions that do not round-trip with nine decimals). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/alloc.h"
#include "serve/serve_internal.h"

/* ---- buffer ---------------------------------------------------------- */

char *keel__buf_room(keel__buf *b, size_t n) {
  if (b->failed) return NULL;
  if (b->len + n + 1 <= b->cap) return b->data + b->len;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + n + 1) {
    if (cap > SIZE_MAX / 2) {
      b->failed = true;
      return NULL;
    }
    cap *= 2;
  }
  char *d = keel__realloc(b->data, cap);
  if (d == NULL) {
    b->failed = true;
    return NULL;
  }
  b->data = d;
  b->cap = cap;
  return b->data + b->len;
}

void keel__buf_put(keel__buf *b, const void *p, size_t n) {
  char *d = keel__buf_room(b, n);
  if (d == NULL) return;
  memcpy(d, p, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void keel__buf_puts(keel__buf *b, const char *s) {
  keel__buf_put(b, s, strlen(s));
}

char *keel__fmt_u64(char *p, uint64_t v) {
  char tmp[24];
  size_t i = sizeof tmp;
  do {
    tmp[--i] = (char)('0' + v % 10);
    v /= 10;
  } while (v != 0);
  memcpy(p, tmp + i, sizeof tmp - i);
  return p + (sizeof tmp - i);
}

void keel__buf_u64(keel__buf *b, uint64_t v) {
  char *p = keel__buf_room(b, 24);
  if (p == NULL) return;
  b->len = (size_t)(keel__fmt_u64(p, v) - b->data);
  b->data[b->len] = '\0';
}

char *keel__fmt_double(char *p, double v) {
  if (isnan(v)) {
    memcpy(p, "NaN", 3);
    return p + 3;
  }
  if (isinf(v)) {
    memcpy(p, v > 0 ? "+Inf" : "-Inf", 4);
    return p + 4;
  }
  double a = fabs(v);
  if (a < 9007199254740992.0 && a == floor(a)) {
    if (v < 0) *p++ = '-';
    return keel__fmt_u64(p, (uint64_t)a);
  }
  if (a < 9e6) {
    /* r / 1e9 is the double nearest to the decimal r·10⁻⁹ (both exact,
     * division correctly rounded), so when it equals v that decimal reads
     * back as v. Seconds from nanosecond or millisecond counts land here.
     * Other values from 0.001 up are written with nine decimals (at least
     * seven significant digits): rates and ratios, where snprintf would
     * cost more than the rest of the line. */
    uint64_t r = (uint64_t)llround(a * 1e9);
    if (a >= 0.001 || (double)r / 1e9 == a) {
      if (v < 0) *p++ = '-';
      p = keel__fmt_u64(p, r / 1000000000u);
      uint64_t frac = r % 1000000000u;
      if (frac == 0) return p;
      char d[9];
      for (int i = 8; i >= 0; i--) {
        d[i] = (char)('0' + frac % 10);
        frac /= 10;
      }
      int n = 9;
      while (n > 0 && d[n - 1] == '0') n--;
      *p++ = '.';
      memcpy(p, d, (size_t)n);
      return p + n;
    }
  }
  int n = snprintf(p, 40, "%.17g", v);
  return p + (n > 0 && n < 40 ? n : 0);
}

void keel__buf_free(keel__buf *b) {
  keel__free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
  b->failed = false;
}

/* Prometheus escapes \ and newline in HELP text, and also " in label
 * values. */
static void escape(keel__buf *b, const char *s, bool quotes) {
  const char *run = s;
  for (; *s; s++) {
    const char *rep = NULL;
    if (*s == '\\')
      rep = "\\\\";
    else if (*s == '"' && quotes)
      rep = "\\\"";
    else if (*s == '\n')
      rep = "\\n";
    if (rep == NULL) continue;
    keel__buf_put(b, run, (size_t)(s - run));
    keel__buf_put(b, rep, 2);
    run = s + 1;
  }
  keel__buf_put(b, run, (size_t)(s - run));
}

void keel__buf_label_escape(keel__buf *b, const char *s) {
  escape(b, s, true);
}

static void help_escape(keel__buf *b, const char *s) {
  escape(b, s, false);
}

static bool utf8_ok(const unsigned char *p) {
  while (*p) {
    unsigned c = *p;
    size_t k;
    if (c < 0x80) {
      p++;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF)
      k = 1;
    else if (c >= 0xE0 && c <= 0xEF)
      k = 2;
    else if (c >= 0xF0 && c <= 0xF4)
      k = 3;
    else
      return false;
    unsigned cp = c & (0x3Fu >> k);
    for (size_t j = 1; j <= k; j++) {
      if ((p[j] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[j] & 0x3Fu);
    }
    if ((k == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
      return false;
    p += k + 1;
  }
  return true;
}

void keel__buf_json_str(keel__buf *b, const char *s) {
  if (!utf8_ok((const unsigned char *)s)) s = "(not UTF-8)";
  keel__buf_put(b, "\"", 1);
  const char *run = s;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    keel__buf_put(b, run, (size_t)(s - run));
    char esc[7] = {'\\', 0};
    size_t n = 2;
    switch (c) {
      case '"':
        esc[1] = '"';
        break;
      case '\\':
        esc[1] = '\\';
        break;
      case '\n':
        esc[1] = 'n';
        break;
      case '\r':
        esc[1] = 'r';
        break;
      case '\t':
        esc[1] = 't';
        break;
      default:
        snprintf(esc, sizeof esc, "\\u%04x", c);
        n = 6;
    }
    keel__buf_put(b, esc, n);
    run = s + 1;
  }
  keel__buf_put(b, run, (size_t)(s - run));
  keel__buf_put(b, "\"", 1);
}

/* ---- writer ---------------------------------------------------------- */

void keel__writer_init(keel_stats_writer *w, keel__wmode mode) {
  memset(w, 0, sizeof *w);
  w->mode = mode;
  w->cur_kind = SIZE_MAX;
}

void keel__writer_dispose(keel_stats_writer *w) {
  for (size_t i = 0; i < w->nfams; i++) {
    keel__free(w->fams[i].name);
    keel__free(w->fams[i].help);
    keel__free(w->fams[i].le);
    keel__buf_free(&w->fams[i].samples);
  }
  for (size_t i = 0; i < w->nkinds; i++) keel__free(w->kinds[i].slots);
  keel__free(w->fams);
  keel__free(w->kinds);
  w->fams = NULL;
  w->kinds = NULL;
  w->nfams = w->capfams = w->nkinds = w->capkinds = 0;
}

void keel__writer_prom_reset(keel_stats_writer *w) {
  for (size_t i = 0; i < w->nfams; i++) {
    w->fams[i].samples.len = 0;
    w->fams[i].samples.failed = false;
  }
  w->failed = false;
}

void keel__writer_prom_object(keel_stats_writer *w, const char *kind, const char *label,
                              size_t label_len) {
  w->label = label;
  w->label_len = label_len;
  w->call = 0;
  w->last_metric = NULL;
  if (w->kind == kind && w->cur_kind != SIZE_MAX) return;
  w->kind = kind;
  w->kind_len = strlen(kind);
  w->cur_kind = SIZE_MAX;
  for (size_t i = 0; i < w->nkinds; i++)
    if (w->kinds[i].kind == kind || strcmp(w->kinds[i].kind, kind) == 0) {
      w->kinds[i].kind = kind;
      w->cur_kind = i;
      return;
    }
  if (w->nkinds == w->capkinds) {
    size_t cap = w->capkinds ? w->capkinds * 2 : 16;
    keel__kind *k = keel__realloc(w->kinds, cap * sizeof *k);
    if (k == NULL) return; /* every call takes the slow path */
    w->kinds = k;
    w->capkinds = cap;
  }
  keel__kind *k = &w->kinds[w->nkinds];
  memset(k, 0, sizeof *k);
  k->kind = kind;
  w->cur_kind = w->nkinds++;
}

/* The family by name, created on first use. */
static keel__family *family_lookup(keel_stats_writer *w, const char *metric, const char *help,
                                   char type, size_t *idx) {
  size_t klen = w->kind_len, mlen = strlen(metric);
  for (size_t i = 0; i < w->nfams; i++) {
    const char *n = w->fams[i].name;
    if (w->fams[i].name_len == 6 + klen + mlen && memcmp(n + 5, w->kind, klen) == 0 &&
        n[5 + klen] == '_' && memcmp(n + 6 + klen, metric, mlen) == 0) {
      *idx = i;
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
  char *help_copy = keel__strdup(help ? help : "");
  if (name == NULL || help_copy == NULL) {
    keel__free(name);
    keel__free(help_copy);
    w->failed = true;
    return NULL;
  }
  memcpy(name, "keel_", 5);
  memcpy(name + 5, w->kind, klen);
  name[5 + klen] = '_';
  memcpy(name + 6 + klen, metric, mlen + 1);
  keel__family *f = &w->fams[w->nfams];
  memset(f, 0, sizeof *f);
  f->name = name;
  f->name_len = 6 + klen + mlen;
  f->help = help_copy;
  f->type = type;
  *idx = w->nfams++;
  return f;
}

/* Whether family f is metric's (of the current kind). */
static bool is_family_of(const keel_stats_writer *w, const keel__family *f, const char *metric) {
  return strcmp(f->name + 6 + w->kind_len, metric) == 0;
}

/* The family of this call: by position in the kind's call order (the
 * same pointer, and the same text: a source may write its names into one
 * reused buffer), else by name. Consecutive calls for one metric
 * (counter_by) share one position. */
static keel__family *family(keel_stats_writer *w, const char *metric, const char *help, char type) {
  if (metric == w->last_metric && is_family_of(w, &w->fams[w->last_fam], metric))
    return &w->fams[w->last_fam];
  keel__kind *k = w->cur_kind != SIZE_MAX ? &w->kinds[w->cur_kind] : NULL;
  size_t idx;
  if (k != NULL && w->call < k->n && k->slots[w->call].metric == metric &&
      is_family_of(w, &w->fams[k->slots[w->call].fam], metric)) {
    idx = k->slots[w->call].fam;
  } else {
    if (family_lookup(w, metric, help, type, &idx) == NULL) return NULL;
    if (k != NULL && w->call <= k->n) {
      if (w->call == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 16;
        keel__kslot *s = keel__realloc(k->slots, cap * sizeof *s);
        if (s != NULL) {
          k->slots = s;
          k->cap = cap;
        }
      }
      if (w->call < k->cap) {
        k->slots[w->call].metric = metric;
        k->slots[w->call].fam = idx;
        if (w->call == k->n) k->n++;
      }
    }
  }
  w->call++;
  w->last_metric = metric;
  w->last_fam = idx;
  return &w->fams[idx];
}

/* Room for one sample line of f: name, suffix, labels, value. */
static char *line_room(keel_stats_writer *w, keel__family *f, size_t extra) {
  return keel__buf_room(&f->samples, f->name_len + w->label_len + extra + 96);
}

/* Writes "<family><suffix>{name="<obj>"" at p. */
static char *line_head(keel_stats_writer *w, keel__family *f, char *p, const char *suffix,
                       size_t slen) {
  memcpy(p, f->name, f->name_len);
  p += f->name_len;
  memcpy(p, suffix, slen);
  p += slen;
  memcpy(p, "{name=\"", 7);
  p += 7;
  memcpy(p, w->label, w->label_len);
  p += w->label_len;
  *p++ = '"';
  return p;
}

static void line_end(keel__family *f, char *p) {
  *p++ = '\n';
  f->samples.len = (size_t)(p - f->samples.data);
  *p = '\0';
}

/* A sample with one more label (escaped). */
static void labelled_line(keel_stats_writer *w, keel__family *f, const char *suffix,
                          const char *label, const char *value, const char *number) {
  size_t slen = strlen(suffix), llen = strlen(label), vlen = strlen(value), nlen = strlen(number);
  char *p = line_room(w, f, slen + llen + 2 * vlen + nlen);
  if (p == NULL) return;
  p = line_head(w, f, p, suffix, slen);
  *p++ = ',';
  memcpy(p, label, llen);
  p += llen;
  *p++ = '=';
  *p++ = '"';
  for (const char *v = value; *v; v++) {
    char ch = *v;
    if (ch == '\\' || ch == '"') {
      *p++ = '\\';
      *p++ = ch;
    } else if (ch == '\n') {
      *p++ = '\\';
      *p++ = 'n';
    } else {
      *p++ = ch;
    }
  }
  memcpy(p, "\"} ", 3);
  p += 3;
  memcpy(p, number, nlen);
  line_end(f, p + nlen);
}

/* JSON: the separator and "<key>": before a field. */
static void json_key(keel_stats_writer *w, const char *key) {
  keel__buf *b = w->out;
  if (w->by_metric != NULL) {
    keel__buf_put(b, "}", 1);
    w->by_metric = NULL;
  }
  if (!w->first) keel__buf_put(b, ",", 1);
  w->first = false;
  keel__buf_json_str(b, key);
  keel__buf_put(b, ":", 1);
}

static void json_double(keel__buf *b, double v) {
  if (!isfinite(v)) {
    keel__buf_put(b, "null", 4);
    return;
  }
  char *p = keel__buf_room(b, 40);
  if (p == NULL) return;
  b->len = (size_t)(keel__fmt_double(p, v) - b->data);
  b->data[b->len] = '\0';
}

void keel_stats_counter(keel_stats_writer *w, const char *metric, const char *help,
                        uint64_t value) {
  if (w == NULL || metric == NULL) return;
  if (w->mode == KEEL__W_JSON) {
    json_key(w, metric);
    keel__buf_u64(w->out, value > (uint64_t)INT64_MAX ? (uint64_t)INT64_MAX : value);
    return;
  }
  keel__family *f = family(w, metric, help, 'c');
  if (f == NULL) return;
  char *p = line_room(w, f, 0);
  if (p == NULL) return;
  p = line_head(w, f, p, "_total", 6);
  memcpy(p, "} ", 2);
  p = keel__fmt_u64(p + 2, value);
  line_end(f, p);
}

void keel_stats_gauge(keel_stats_writer *w, const char *metric, const char *help, double value) {
  if (w == NULL || metric == NULL) return;
  if (w->mode == KEEL__W_JSON) {
    json_key(w, metric);
    json_double(w->out, value);
    return;
  }
  keel__family *f = family(w, metric, help, 'g');
  if (f == NULL) return;
  char *p = line_room(w, f, 0);
  if (p == NULL) return;
  p = line_head(w, f, p, "", 0);
  memcpy(p, "} ", 2);
  p = keel__fmt_double(p + 2, value);
  line_end(f, p);
}

void keel_stats_counter_by(keel_stats_writer *w, const char *metric, const char *help,
                           const char *label, const char *label_value, uint64_t value) {
  if (w == NULL || metric == NULL || label == NULL) return;
  if (label_value == NULL) label_value = "";
  if (value > (uint64_t)INT64_MAX && w->mode == KEEL__W_JSON) value = (uint64_t)INT64_MAX;
  if (w->mode == KEEL__W_JSON) {
    keel__buf *b = w->out;
    if (w->by_metric == NULL || strcmp(w->by_metric, metric) != 0) {
      json_key(w, metric);
      keel__buf_put(b, "{", 1);
      w->by_metric = metric;
    } else {
      keel__buf_put(b, ",", 1);
    }
    keel__buf_json_str(b, label_value);
    keel__buf_put(b, ":", 1);
    keel__buf_u64(b, value);
    return;
  }
  keel__family *f = family(w, metric, help, 'c');
  if (f == NULL) return;
  char num[24];
  *keel__fmt_u64(num, value) = '\0';
  labelled_line(w, f, "_total", label, label_value, num);
}

void keel_stats_state(keel_stats_writer *w, const char *metric, const char *help,
                      const char *const *names, size_t n, size_t current) {
  if (w == NULL || metric == NULL || names == NULL || n == 0) return;
  if (w->mode == KEEL__W_JSON) {
    json_key(w, metric);
    if (current < n)
      keel__buf_json_str(w->out, names[current]);
    else
      keel__buf_put(w->out, "null", 4);
    return;
  }
  keel__family *f = family(w, metric, help, 'g');
  if (f == NULL) return;
  for (size_t i = 0; i < n; i++)
    labelled_line(w, f, "", "state", names[i], i == current ? "1" : "0");
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

/* The texts of a family's bucket bounds, formatted once per bounds array
 * (sources pass the same static array every time). */
static bool le_texts(keel_stats_writer *w, keel__family *f, const double *upper, size_t n) {
  if (f->le != NULL && f->le_upper == upper && f->le_n == n &&
      memcmp(f->le_vals, upper, n * sizeof *upper) == 0)
    return true;
  char(*le)[40] =
      keel__realloc(f->le, (n ? n : 1) * (sizeof *le + sizeof(double) + sizeof(size_t)));
  if (le == NULL) {
    w->failed = true;
    return false;
  }
  f->le = le;
  f->le_vals = (double *)(le + (n ? n : 1));
  f->le_len = (size_t *)(f->le_vals + (n ? n : 1));
  for (size_t i = 0; i < n; i++) f->le_len[i] = (size_t)(keel__fmt_double(le[i], upper[i]) - le[i]);
  if (n > 0) memcpy(f->le_vals, upper, n * sizeof *upper);
  f->le_upper = upper;
  f->le_n = n;
  return true;
}

void keel_stats_histogram(keel_stats_writer *w, const char *metric, const char *help,
                          size_t nbuckets, const double *upper, const uint64_t *counts, double sum,
                          uint64_t count) {
  if (w == NULL || metric == NULL || (nbuckets > 0 && (upper == NULL || counts == NULL))) return;
  if (w->mode == KEEL__W_JSON) {
    keel__buf *b = w->out;
    json_key(w, metric);
    keel__buf_put(b, "{\"count\":", 9);
    keel__buf_u64(b, count > (uint64_t)INT64_MAX ? (uint64_t)INT64_MAX : count);
    keel__buf_put(b, ",\"sum\":", 7);
    json_double(b, sum);
    keel__buf_put(b, ",\"p50\":", 7);
    json_double(b, hist_quantile(nbuckets, upper, counts, count, 0.50));
    keel__buf_put(b, ",\"p99\":", 7);
    json_double(b, hist_quantile(nbuckets, upper, counts, count, 0.99));
    keel__buf_put(b, "}", 1);
    return;
  }
  keel__family *f = family(w, metric, help, 'h');
  if (f == NULL || !le_texts(w, f, upper, nbuckets)) return;
  /* Every bucket line starts alike: <family>_bucket{name="<obj>",le=" */
  char head[512];
  size_t hlen = f->name_len + 7 + 7 + w->label_len + 6;
  if (hlen > sizeof head) {
    w->failed = true;
    return;
  }
  char *h = line_head(w, f, head, "_bucket", 7);
  memcpy(h, ",le=\"", 5);
  uint64_t cum = 0;
  for (size_t i = 0; i <= nbuckets; i++) {
    char *p = keel__buf_room(&f->samples, hlen + 40 + 28);
    if (p == NULL) return;
    memcpy(p, head, hlen);
    p += hlen;
    if (i < nbuckets) {
      size_t l = f->le_len[i];
      memcpy(p, f->le[i], l);
      p += l;
      cum += counts[i];
    } else {
      memcpy(p, "+Inf", 4);
      p += 4;
      cum = count;
    }
    memcpy(p, "\"} ", 3);
    p = keel__fmt_u64(p + 3, cum > count ? count : cum);
    line_end(f, p);
  }
  char *p = line_room(w, f, 0);
  if (p == NULL) return;
  p = line_head(w, f, p, "_sum", 4);
  memcpy(p, "} ", 2);
  p = keel__fmt_double(p + 2, sum);
  line_end(f, p);
  p = line_room(w, f, 0);
  if (p == NULL) return;
  p = line_head(w, f, p, "_count", 6);
  memcpy(p, "} ", 2);
  p = keel__fmt_u64(p + 2, count);
  line_end(f, p);
}

void keel_stats_text(keel_stats_writer *w, const char *key, const char *value) {
  if (w == NULL || key == NULL || w->mode != KEEL__W_JSON) return;
  json_key(w, key);
  if (value == NULL)
    keel__buf_put(w->out, "null", 4);
  else
    keel__buf_json_str(w->out, value);
}

void keel__writer_prom_finish(keel_stats_writer *w, keel__buf *out) {
  size_t total = 0;
  for (size_t i = 0; i < w->nfams; i++) {
    if (w->fams[i].samples.failed) w->failed = true;
    total += w->fams[i].samples.len + 2 * w->fams[i].name_len + 64;
  }
  if (keel__buf_room(out, total) == NULL) return;
  for (size_t i = 0; i < w->nfams; i++) {
    keel__family *f = &w->fams[i];
    if (f->samples.len == 0) continue; /* no object of that kind left */
    const char *type = f->type == 'c' ? "counter" : f->type == 'g' ? "gauge" : "histogram";
    const char *total_sfx = f->type == 'c' ? "_total" : "";
    keel__buf_put(out, "# HELP ", 7);
    keel__buf_put(out, f->name, f->name_len);
    keel__buf_puts(out, total_sfx);
    keel__buf_put(out, " ", 1);
    help_escape(out, f->help);
    keel__buf_put(out, "\n# TYPE ", 8);
    keel__buf_put(out, f->name, f->name_len);
    keel__buf_puts(out, total_sfx);
    keel__buf_put(out, " ", 1);
    keel__buf_puts(out, type);
    keel__buf_put(out, "\n", 1);
    keel__buf_put(out, f->samples.data, f->samples.len);
  }
}

bool keel__json_object(keel__buf *out, const keel_stats_source *src, const void *obj,
                       const char *name, uint64_t id) {
  keel_stats_writer w;
  keel__writer_init(&w, KEEL__W_JSON);
  w.kind = src->kind;
  w.out = out;
  w.first = true;
  if (name != NULL) {
    keel__buf_put(out, "{", 1);
    if (id != 0) {
      keel__buf_put(out, "\"id\":", 5);
      keel__buf_u64(out, id);
      keel__buf_put(out, ",", 1);
    }
    keel__buf_put(out, "\"kind\":", 7);
    keel__buf_json_str(out, src->kind);
    keel__buf_put(out, ",\"name\":", 8);
    keel__buf_json_str(out, name);
    keel__buf_put(out, ",\"stats\":", 9);
  }
  keel__buf_put(out, "{", 1);
  src->write(obj, &w);
  if (w.by_metric != NULL) keel__buf_put(out, "}", 1);
  keel__buf_put(out, name != NULL ? "}}" : "}", name != NULL ? 2 : 1);
  return !out->failed;
}
