#include "core/alloc.h"

#include <stdint.h>
#include <stdlib.h>

#include "keel/common.h"

/* The allocator table is process-wide by design, like libuv's: it is set once
 * before any keel object exists and only read afterwards. */
static struct {
  keel_malloc_fn malloc_fn;
  keel_realloc_fn realloc_fn;
  keel_calloc_fn calloc_fn;
  keel_free_fn free_fn;
} allocator = {malloc, realloc, calloc, free};

int keel_replace_allocator(keel_malloc_fn malloc_fn, keel_realloc_fn realloc_fn,
                           keel_calloc_fn calloc_fn, keel_free_fn free_fn) {
  if (malloc_fn == NULL || realloc_fn == NULL || calloc_fn == NULL || free_fn == NULL)
    return UV_EINVAL;
  allocator.malloc_fn = malloc_fn;
  allocator.realloc_fn = realloc_fn;
  allocator.calloc_fn = calloc_fn;
  allocator.free_fn = free_fn;
  return 0;
}

void *keel__malloc(size_t size) {
  return allocator.malloc_fn(size == 0 ? 1 : size);
}

void *keel__realloc(void *ptr, size_t size) {
  return allocator.realloc_fn(ptr, size == 0 ? 1 : size);
}

void *keel__calloc(size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) return NULL;
  if (count == 0 || size == 0) count = size = 1;
  return allocator.calloc_fn(count, size);
}

void keel__free(void *ptr) {
  if (ptr != NULL) allocator.free_fn(ptr);
}

void keel_free(void *ptr) {
  keel__free(ptr);
}

char *keel__strndup(const char *s, size_t len) {
  if (s == NULL) return NULL;
  char *copy = keel__malloc(len + 1);
  if (copy == NULL) return NULL;
  memcpy(copy, s, len);
  copy[len] = '\0';
  return copy;
}

char *keel__strdup(const char *s) {
  return s == NULL ? NULL : keel__strndup(s, strlen(s));
}
