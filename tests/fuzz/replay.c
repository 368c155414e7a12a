/* Driver that runs a libFuzzer target as a regular test: every file of the
 * corpus directory given as argv[1], then mutations of each (bytes replaced,
 * inserted, deleted, a piece repeated, the end cut), then 20000 pseudo-random
 * inputs. The seed is fixed, so a failure is reproducible. Crashes and
 * sanitizer reports fail it. */
#define _DEFAULT_SOURCE /* scandir, alphasort */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MUTATIONS_PER_FILE 2000
#define MUTANT_MAX 8192

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next_random(void) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return (uint32_t)(state >> 33);
}

static const char alphabet[] = "=.,()&|!\"\\{}[]:01239-eqnltgisu_abcxyz \t\n\x80\xff";

/* A few random edits of seed[0..n) into out; returns the new length. */
static size_t mutate(const uint8_t *seed, size_t n, uint8_t *out) {
  size_t len = n < MUTANT_MAX ? n : MUTANT_MAX;
  memcpy(out, seed, len);
  int edits = 1 + (int)(next_random() % 4);
  for (int e = 0; e < edits; e++) {
    size_t at = len ? next_random() % len : 0;
    switch (next_random() % 6) {
      case 0: /* a byte replaced by any byte */
        if (len) out[at] = (uint8_t)next_random();
        break;
      case 1: /* a byte replaced by one the targets' grammars use */
        if (len) out[at] = (uint8_t)alphabet[next_random() % (sizeof alphabet - 1)];
        break;
      case 2: /* a byte inserted */
        if (len < MUTANT_MAX) {
          memmove(out + at + 1, out + at, len - at);
          out[at] = (uint8_t)next_random();
          len++;
        }
        break;
      case 3: /* a byte deleted */
        if (len) {
          memmove(out + at, out + at + 1, len - at - 1);
          len--;
        }
        break;
      case 4: { /* a piece repeated in place */
        size_t piece = len - at < 16 ? len - at : 1 + next_random() % 16;
        if (len + piece <= MUTANT_MAX) {
          memmove(out + at + piece, out + at, len - at);
          len += piece;
        }
        break;
      }
      default: /* the end cut */
        len = at;
        break;
    }
  }
  return len;
}

/* The target sees exactly `size` bytes of their own allocation, so that
 * AddressSanitizer catches a read past them. */
static void run_one(const uint8_t *data, size_t size) {
  uint8_t *copy = malloc(size ? size : 1);
  if (copy == NULL) abort();
  memcpy(copy, data, size);
  LLVMFuzzerTestOneInput(copy, size);
  free(copy);
}

static int replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return 0;
  static uint8_t buf[65536], mutant[MUTANT_MAX];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  run_one(buf, n);
  for (int i = 0; i < MUTATIONS_PER_FILE; i++) run_one(mutant, mutate(buf, n, mutant));
  return 1;
}

int main(int argc, char **argv) {
  int files = 0;
  if (argc > 1) {
    /* in name order: the same mutations on every run */
    struct dirent **entries;
    int count = scandir(argv[1], &entries, NULL, alphasort);
    for (int i = 0; i < count; i++) {
      if (entries[i]->d_name[0] != '.') {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", argv[1], entries[i]->d_name);
        files += replay_file(path);
      }
      free(entries[i]);
    }
    if (count >= 0) free(entries);
  }
  uint8_t buf[512];
  for (int i = 0; i < 20000; i++) {
    size_t len = next_random() % sizeof buf;
    for (size_t j = 0; j < len; j++)
      buf[j] = (uint8_t)alphabet[next_random() % (sizeof alphabet - 1)];
    run_one(buf, len);
  }
  printf("replayed %d corpus files with %d mutations each and 20000 random inputs\n", files,
         MUTATIONS_PER_FILE);
  return 0;
}
