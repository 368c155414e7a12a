/* Driver that runs a libFuzzer target as a regular test: every file of the
 * corpus directory given as argv[1], then 20000 pseudo-random inputs (fixed
 * seed, so a failure is reproducible). Crashes and sanitizer reports fail it. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return 0;
  uint8_t buf[65536];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  LLVMFuzzerTestOneInput(buf, n);
  return 1;
}

int main(int argc, char **argv) {
  int files = 0;
  if (argc > 1) {
    DIR *dir = opendir(argv[1]);
    if (dir != NULL) {
      struct dirent *entry;
      while ((entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", argv[1], entry->d_name);
        files += replay_file(path);
      }
      closedir(dir);
    }
  }
  uint64_t state = 0x9E3779B97F4A7C15ull;
  uint8_t buf[512];
  const char alphabet[] = "=.,()&|!\"\\{}[]:01239-eqnltgisu_abcxyz \t\n\x80\xff";
  for (int i = 0; i < 20000; i++) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    size_t len = (size_t)(state >> 33) % sizeof buf;
    for (size_t j = 0; j < len; j++) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      buf[j] = (uint8_t)alphabet[(state >> 33) % (sizeof alphabet - 1)];
    }
    LLVMFuzzerTestOneInput(buf, len);
  }
  printf("replayed %d corpus files and 20000 random inputs\n", files);
  return 0;
}
