/* Issue 12 #2: keel's typed filters against PostgreSQL itself. For each
 * supported type and operator, generated (value, literal) pairs, edge values
 * included: the listener's evaluator (typed the way the listener types it at
 * start: the literal's canonical text from the server, the column's class)
 * and the trigger's WHEN condition must both decide exactly as the server
 * does for `value OP literal` (text ordering bytewise, COLLATE "C"). */
#include <criterion/criterion.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "listen/filter.h"
#include "support/harness.h"

typedef struct type_case {
  const char *type;  /* SQL type */
  const char *kind;  /* "text", "bpchar" or "" (how the direct comparison orders) */
  unsigned oid;      /* base type oid, as the listener reads it */
  const char *edges; /* '|'-separated edge values, also used as literals */
  const char *(*gen)(unsigned *seed, char *buf, size_t cap);
} type_case;

static unsigned next(unsigned *seed) {
  *seed = *seed * 1103515245u + 12345u;
  return (*seed >> 8) & 0xFFFFFF;
}

static const char *gen_int(unsigned *seed, char *buf, size_t cap) {
  snprintf(buf, cap, "%d", (int)(next(seed) % 2001) - 1000);
  return buf;
}

static const char *gen_numeric(unsigned *seed, char *buf, size_t cap) {
  unsigned r = next(seed);
  snprintf(buf, cap, "%s%u.%0*u", r & 1 ? "-" : "", (r >> 1) % 30, 1 + (int)((r >> 6) % 4),
           (r >> 9) % 100);
  return buf;
}

static const char *gen_float(unsigned *seed, char *buf, size_t cap) {
  unsigned r = next(seed);
  snprintf(buf, cap, "%s%u.%ue%d", r & 1 ? "-" : "", (r >> 1) % 10, (r >> 5) % 1000,
           (int)((r >> 15) % 41) - 20);
  return buf;
}

static const char *gen_text(unsigned *seed, char *buf, size_t cap) {
  static const char *alphabet[] = {"a", "b", "A", "Z", "0", "9", " ", "\xc3\xa9", "\xc3\xa4", "_"};
  unsigned r = next(seed);
  size_t n = r % 4, at = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < n && at + 3 < cap; i++) {
    const char *piece = alphabet[next(seed) % 10];
    at += (size_t)snprintf(buf + at, cap - at, "%s", piece);
  }
  return buf;
}

static const char *gen_bool(unsigned *seed, char *buf, size_t cap) {
  static const char *forms[] = {"true", "false", "t", "f", "yes", "no", "on", "off", "1", "0"};
  snprintf(buf, cap, "%s", forms[next(seed) % 10]);
  return buf;
}

static const char *gen_uuid(unsigned *seed, char *buf, size_t cap) {
  unsigned a = next(seed) % 4, b = next(seed) % 3;
  snprintf(
      buf, cap,
      b ? "0000000%u-0000-0000-0000-00000000000%u" : "{0000000%u-0000-0000-0000-00000000000%u}", a,
      next(seed) % 3);
  return buf;
}

static const char *gen_date(unsigned *seed, char *buf, size_t cap) {
  unsigned r = next(seed);
  snprintf(buf, cap, "%04u-%02u-%02u%s", 1999 + r % 3, 1 + (r >> 2) % 12, 1 + (r >> 6) % 28,
           (r >> 11) % 9 == 0 ? " BC" : "");
  return buf;
}

static const char *gen_timestamp(unsigned *seed, char *buf, size_t cap) {
  unsigned r = next(seed);
  snprintf(buf, cap, "2020-01-%02u %02u:%02u:00%s", 1 + r % 3, (r >> 2) % 24, ((r >> 7) % 2) * 30,
           (r >> 9) % 3 == 0 ? ".5" : "");
  return buf;
}

static const char *gen_timestamptz(unsigned *seed, char *buf, size_t cap) {
  static const char *zones[] = {"+00", "+05:30", "-08", "+01", "Z"};
  unsigned r = next(seed);
  snprintf(buf, cap, "2020-01-%02u %02u:%02u:00%s", 1 + r % 2, (r >> 2) % 24, ((r >> 7) % 2) * 30,
           zones[(r >> 9) % 5]);
  return buf;
}

static const char *gen_interval(unsigned *seed, char *buf, size_t cap) {
  /* two different units: PostgreSQL refuses a unit given twice */
  static const char *units[] = {"days", "hours", "mons", "minutes", "seconds", "years"};
  unsigned r = next(seed), first = (r >> 6) % 6, second = (first + 1 + (r >> 15) % 5) % 6;
  snprintf(buf, cap, "%d %s %d %s", (int)(r % 61) - 30, units[first], (int)((r >> 9) % 49) - 24,
           units[second]);
  return buf;
}

static const type_case cases[] = {
    {"integer", "", 23, "0|1|-1|2147483647|-2147483648|10|9| 3 |007", gen_int},
    {"bigint", "", 20,
     "9007199254740992|9007199254740993|-9223372036854775808|9223372036854775807|0", gen_int},
    {"numeric", "", 1700,
     "0|-0|0.1|0.10|19.90|19.9|1e-30|123456789012345678901234567890|NaN|Infinity|-Infinity|"
     "9007199254740993|1.0|1|-0.00",
     gen_numeric},
    {"double precision", "", 701,
     "0|-0|0.1|1e-30|NaN|Infinity|-Infinity|1.5|2.5e300|9007199254740993|1e-300", gen_float},
    {"real", "", 700, "0|-0|0.1|1e-30|NaN|Infinity|1.5|3.4e38|16777217", gen_float},
    {"text", "text", 25, "|a|A|10|9|1.0|1|\xc3\xa9|e|z|a b|NULL|\xf0\x9f\x98\x80", gen_text},
    {"varchar(8)", "text", 1043, "|a|b|10|9", gen_text},
    {"character(3)", "bpchar", 1042, "|a|a |ab|b|A", gen_text},
    {"boolean", "", 16, "true|false|t|f|yes|off", gen_bool},
    {"uuid", "", 2950,
     "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11|"
     "a0eebc999c0b4ef8bb6d6bb9bd380a11",
     gen_uuid},
    {"date", "", 1082, "2000-01-01|1999-12-31|infinity|-infinity|0044-03-15 BC|2000-02-29",
     gen_date},
    {"timestamp", "", 1114,
     "2020-01-01 00:00:00|2020-01-01 00:00:00.000001|infinity|-infinity|0044-03-15 10:00 BC",
     gen_timestamp},
    {"timestamptz", "", 1184,
     "2020-01-01 00:00:00+00|2020-01-01 05:30:00+05:30|2019-12-31 16:00:00-08|infinity|"
     "-infinity|2020-01-01 10:00:00.5+00",
     gen_timestamptz},
    {"interval", "", 1186,
     "1 day|24 hours|1 mon|30 days|1 year|360 days|-1 day 2 hours|-22 hours|0|1.5 seconds|"
     "P1DT0.5S|-0.000001 seconds|86400.5 seconds|2 days -23:59:59.5",
     gen_interval},
};

static const char *ops[] = {"eq", "neq", "lt", "lte", "gt", "gte", "isdistinct", "not.eq", "in"};

/* Splits '|'-separated text into a NULL-terminated array (strdup'd). */
static int split(const char *text, char **out, int cap) {
  int n = 0;
  const char *p = text;
  while (n < cap - 1) {
    const char *bar = strchr(p, '|');
    size_t len = bar ? (size_t)(bar - p) : strlen(p);
    out[n++] = strndup(p, len);
    if (bar == NULL) break;
    p = bar + 1;
  }
  out[n] = NULL;
  return n;
}

static PGconn *db;

static PGresult *query(const char *sql, int n, const char *const *params) {
  PGresult *res = PQexecParams(db, sql, n, NULL, params, NULL, NULL, 0);
  cr_assert(PQresultStatus(res) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(db));
  return res;
}

static const char *lookup_value(void *row, const char *column, bool *present) {
  (void)column;
  *present = true;
  return row;
}

/* A filter value for PostgREST syntax: quoted inside in.() when needed. */
static void filter_literal(char *out, size_t cap, const char *value, bool in_list) {
  bool quote = in_list && (value[0] == '\0' || strpbrk(value, ",()\"\\") != NULL);
  if (!quote) {
    snprintf(out, cap, "%s", value);
    return;
  }
  size_t at = 0;
  out[at++] = '"';
  for (const char *p = value; *p != '\0' && at + 3 < cap; p++) {
    if (*p == '"' || *p == '\\') out[at++] = '\\';
    out[at++] = *p;
  }
  out[at++] = '"';
  out[at] = '\0';
}

static void run_case(const type_case *tc, long *decisions) {
  char *edges[64];
  int n_edges = split(tc->edges, edges, 64);
  char *values[128];
  int n = 0;
  for (int i = 0; i < n_edges; i++) values[n++] = strdup(edges[i]);
  unsigned seed = 12345u + tc->oid;
  char buf[128];
  while (n < 70) values[n++] = strdup(tc->gen(&seed, buf, sizeof buf));
  values[n] = NULL;
  /* the values as a column of the type, and each one's delivered text */
  char array_lit[16384];
  size_t at = (size_t)snprintf(array_lit, sizeof array_lit, "{");
  for (int i = 0; i < n; i++) {
    at += (size_t)snprintf(array_lit + at, sizeof array_lit - at, "%s\"", i ? "," : "");
    for (const char *p = values[i]; *p; p++) {
      if (*p == '"' || *p == '\\') array_lit[at++] = '\\';
      array_lit[at++] = *p;
    }
    at += (size_t)snprintf(array_lit + at, sizeof array_lit - at, "\"");
  }
  snprintf(array_lit + at, sizeof array_lit - at, "}");
  char sql[4096];
  /* what the listener delivers: the text output (format %s), booleans as
   * true / false */
  snprintf(sql, sizeof sql,
           "SELECT CASE WHEN pg_typeof(c) = 'boolean'::regtype THEN c::text ELSE format('%%s', c) "
           "END FROM (SELECT v::%s AS c, i FROM unnest($1::text[]) WITH ORDINALITY x(v, i)) r "
           "ORDER BY i",
           tc->type);
  const char *p1[] = {array_lit};
  PGresult *delivered = query(sql, 1, p1);
  cr_assert_eq(PQntuples(delivered), n);

  for (size_t oi = 0; oi < sizeof ops / sizeof ops[0]; oi++) {
    bool in_list = strcmp(ops[oi], "in") == 0;
    bool ordering = strchr("lg", ops[oi][0]) != NULL;
    for (int li = 0; li < n_edges + 8; li++) {
      /* literals: every edge value, and a few generated ones */
      char lit_buf[128];
      const char *lit = li < n_edges ? edges[li] : tc->gen(&seed, lit_buf, sizeof lit_buf);
      char lit2_buf[128];
      const char *lit2 = tc->gen(&seed, lit2_buf, sizeof lit2_buf);
      const char *lit3 = edges[(li + 1) % n_edges];
      char filter[1024], f1[300], f2[300], f3[300];
      filter_literal(f1, sizeof f1, lit, in_list);
      if (in_list) {
        filter_literal(f2, sizeof f2, lit2, true);
        filter_literal(f3, sizeof f3, lit3, true);
        snprintf(filter, sizeof filter, "c=in.(%s,%s,%s)", f1, f2, f3);
      } else {
        snprintf(filter, sizeof filter, "c=%s.%s", ops[oi], f1);
      }
      keel__filter f;
      char why[256];
      cr_assert_eq(keel__filter_parse(&f, filter, why, sizeof why), 0, "%s: %s", filter, why);
      keel__filter_term *t = &f.terms[0];
      /* type it as the listener does: the server's canonical text of each
       * literal, the class of the column's type */
      const char *canon[3];
      PGresult *canon_res[3];
      for (size_t v = 0; v < t->value_count; v++) {
        snprintf(sql, sizeof sql, "SELECT $1::%s::text, pg_typeof($1::%s) = 'boolean'::regtype",
                 tc->type, tc->type);
        const char *p[] = {t->values[v]};
        canon_res[v] = query(sql, 1, p);
        canon[v] = PQgetvalue(canon_res[v], 0, 0);
        if (strcmp(PQgetvalue(canon_res[v], 0, 1), "f") == 0) {
          /* the canonical text is the output function's (format %s) */
          snprintf(sql, sizeof sql, "SELECT format('%%s', $1::%s)", tc->type);
          PQclear(canon_res[v]);
          canon_res[v] = query(sql, 1, p);
          canon[v] = PQgetvalue(canon_res[v], 0, 0);
        }
      }
      cr_assert_eq(keel__filter_set_typed(t, keel__filter_cmp_of(tc->oid), canon), 0);
      cr_assert(keel__filter_op_supported(t->op, keel__filter_cmp_of(tc->oid)));
      /* the server: the trigger's WHEN, and the comparison itself */
      char when[8192];
      cr_assert_gt(keel__filter_to_sql(&f, "r", when, sizeof when), 0);
      char direct[2048];
      const char *lhs = strcmp(tc->kind, "text") == 0     ? "c::text COLLATE \"C\""
                        : strcmp(tc->kind, "bpchar") == 0 ? "rtrim(c::text, ' ') COLLATE \"C\""
                                                          : "c";
      const char *cast = strcmp(tc->kind, "text") == 0     ? "$2::text"
                         : strcmp(tc->kind, "bpchar") == 0 ? "rtrim($2, ' ')"
                                                           : NULL;
      char rhs[256];
      if (cast != NULL && ordering)
        snprintf(rhs, sizeof rhs, "%s", cast);
      else
        snprintf(rhs, sizeof rhs, "$2::%s", tc->type);
      if (in_list)
        snprintf(direct, sizeof direct, "c IN ($2::%s, $3::%s, $4::%s)", tc->type, tc->type,
                 tc->type);
      else if (strcmp(ops[oi], "isdistinct") == 0)
        snprintf(direct, sizeof direct, "c IS DISTINCT FROM $2::%s", tc->type);
      else if (strcmp(ops[oi], "not.eq") == 0)
        snprintf(direct, sizeof direct, "NOT (c = $2::%s)", tc->type);
      else {
        static const char *sym[] = {"=", "<>", "<", "<=", ">", ">="};
        snprintf(direct, sizeof direct, "%s %s %s", ordering ? lhs : "c", sym[oi], rhs);
      }
      static char big[16384];
      snprintf(big, sizeof big,
               "SELECT coalesce((%s), false), coalesce((%s), false) FROM (SELECT v::%s AS c, i "
               "FROM unnest($1::text[]) WITH ORDINALITY x(v, i)) r ORDER BY i",
               when, direct, tc->type);
      const char *params[] = {array_lit, lit, lit2, lit3};
      int nparams = in_list ? 4 : 2;
      PGresult *res = query(big, nparams, params);
      for (int i = 0; i < n; i++) {
        bool server = strcmp(PQgetvalue(res, i, 1), "t") == 0;
        bool trigger = strcmp(PQgetvalue(res, i, 0), "t") == 0;
        const char *value = PQgetvalue(delivered, i, 0);
        bool keel = keel__filter_match(&f, lookup_value, (void *)value);
        cr_assert_eq(trigger, server, "%s: WHEN on [%s] gave %d, server %d (%s)", tc->type,
                     values[i], trigger, server, filter);
        cr_assert_eq(keel, server,
                     "%s: evaluator on [%s] (delivered as [%s]) gave %d, server %d (%s)", tc->type,
                     values[i], value, keel, server, filter);
        (*decisions)++;
      }
      PQclear(res);
      for (size_t v = 0; v < t->value_count; v++) PQclear(canon_res[v]);
      keel__filter_free(&f);
    }
  }
  PQclear(delivered);
  for (int i = 0; i < n; i++) free(values[i]);
  for (int i = 0; i < n_edges; i++) free(edges[i]);
}

Test(listen_filter_diff, typed_filters_decide_like_postgresql, .timeout = 600) {
  db = PQconnectdb(kt_pg_conninfo());
  cr_assert_eq(PQstatus(db), CONNECTION_OK);
  PQclear(PQexec(db, "SET TimeZone = 'UTC'"));
  long decisions = 0;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i], &decisions);
  cr_assert_gt(decisions, 50000);
  /* the empty list matches nothing, not.in.() everything */
  keel__filter f;
  char why[64];
  cr_assert_eq(keel__filter_parse(&f, "c=in.()", why, sizeof why), 0);
  cr_assert(!keel__filter_match(&f, lookup_value, (void *)"1"));
  keel__filter_free(&f);
  cr_assert_eq(keel__filter_parse(&f, "c=not.in.()", why, sizeof why), 0);
  cr_assert(keel__filter_match(&f, lookup_value, (void *)"1"));
  keel__filter_free(&f);
  PQfinish(db);
}
