/* Names to URL slugs, with the common Latin accents transliterated. */
#include <stdbool.h>
#include <string.h>

#include "keel/integrity.h"

/* Transliteration of U+00C0..U+017F (Latin-1 Supplement and Latin
 * Extended-A); NULL means "drop". */
static const char *latin(unsigned cp) {
  static const char *const latin1[64] = {/* C0 */ "a", "a", "a", "a", "a", "a", "ae", "c",
                                         "e",          "e", "e", "e", "i", "i", "i",  "i",
                                         /* D0 */ "d", "n", "o", "o", "o", "o", "o",  NULL,
                                         "o",          "u", "u", "u", "u", "y", "th", "ss",
                                         /* E0 */ "a", "a", "a", "a", "a", "a", "ae", "c",
                                         "e",          "e", "e", "e", "i", "i", "i",  "i",
                                         /* F0 */ "d", "n", "o", "o", "o", "o", "o",  NULL,
                                         "o",          "u", "u", "u", "u", "y", "th", "y"};
  static const char *const extended[128] = {
      /* 100 */ "a", "a", "a",  "a",  "a", "a", "c", "c",
      "c",           "c", "c",  "c",  "c", "c", "d", "d",
      /* 110 */ "d", "d", "e",  "e",  "e", "e", "e", "e",
      "e",           "e", "e",  "e",  "g", "g", "g", "g",
      /* 120 */ "g", "g", "g",  "g",  "h", "h", "h", "h",
      "i",           "i", "i",  "i",  "i", "i", "i", "i",
      /* 130 */ "i", "i", "ij", "ij", "j", "j", "k", "k",
      "k",           "l", "l",  "l",  "l", "l", "l", "l",
      /* 140 */ "l", "l", "l",  "n",  "n", "n", "n", "n",
      "n",           "n", "n",  "n",  "o", "o", "o", "o",
      /* 150 */ "o", "o", "oe", "oe", "r", "r", "r", "r",
      "r",           "r", "s",  "s",  "s", "s", "s", "s",
      /* 160 */ "s", "s", "t",  "t",  "t", "t", "t", "t",
      "u",           "u", "u",  "u",  "u", "u", "u", "u",
      /* 170 */ "u", "u", "u",  "u",  "w", "w", "y", "y",
      "y",           "z", "z",  "z",  "z", "z", "z", "s"};
  if (cp >= 0xC0 && cp < 0x100) return latin1[cp - 0xC0];
  if (cp >= 0x100 && cp < 0x180) return extended[cp - 0x100];
  return NULL;
}

/* Decodes one UTF-8 sequence; returns its length (1 for invalid bytes, which
 * are then dropped). */
static size_t decode(const unsigned char *s, unsigned *cp) {
  if (s[0] < 0x80) {
    *cp = s[0];
    return 1;
  }
  if ((s[0] & 0xE0) == 0xC0 && (s[1] & 0xC0) == 0x80) {
    *cp = ((unsigned)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    return 2;
  }
  if ((s[0] & 0xF0) == 0xE0 && (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80) {
    *cp = ((unsigned)(s[0] & 0x0F) << 12) | ((unsigned)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    return 3;
  }
  if ((s[0] & 0xF8) == 0xF0 && (s[1] & 0xC0) == 0x80 && (s[2] & 0xC0) == 0x80 &&
      (s[3] & 0xC0) == 0x80) {
    *cp = 0x10000; /* outside what we transliterate */
    return 4;
  }
  *cp = 0xFFFD;
  return 1;
}

int keel_slugify(const char *name, size_t max_len, char *out, size_t cap) {
  if (name == NULL || out == NULL || max_len == 0) return UV_EINVAL;
  if (cap <= max_len) return UV_ENOBUFS;
  size_t len = 0;
  size_t last_boundary = 0; /* length before the last '-' written */
  bool pending_dash = false;
  bool cut_mid_word = false;
  const unsigned char *s = (const unsigned char *)name;
  while (*s != '\0') {
    unsigned cp;
    s += decode(s, &cp);
    const char *piece;
    char ascii[2] = {0, 0};
    if (cp < 0x80) {
      if (cp >= 'A' && cp <= 'Z') cp = cp - 'A' + 'a';
      if ((cp >= 'a' && cp <= 'z') || (cp >= '0' && cp <= '9')) {
        ascii[0] = (char)cp;
        piece = ascii;
      } else {
        piece = NULL;
      }
    } else {
      piece = latin(cp);
    }
    if (piece == NULL) {
      pending_dash = len > 0;
      continue;
    }
    size_t piece_len = strlen(piece);
    size_t need = piece_len + (pending_dash ? 1 : 0);
    if (len + need > max_len) {
      cut_mid_word = !pending_dash;
      break;
    }
    if (pending_dash) {
      last_boundary = len;
      out[len++] = '-';
      pending_dash = false;
    }
    memcpy(out + len, piece, piece_len);
    len += piece_len;
  }
  /* Cut at a word boundary when the name did not fit. */
  if (cut_mid_word && last_boundary > 0) len = last_boundary;
  if (len == 0) {
    const char fallback[] = "item";
    len = max_len < sizeof fallback - 1 ? max_len : sizeof fallback - 1;
    memcpy(out, fallback, len);
  }
  out[len] = '\0';
  return (int)len;
}
