/* Internal allocation wrappers: every keel allocation goes through these so
 * that keel_replace_allocator() sees all of it. */
#ifndef KEEL_CORE_ALLOC_H
#define KEEL_CORE_ALLOC_H

#include <stddef.h>
#include <string.h>

void *keel__malloc(size_t size);
void *keel__realloc(void *ptr, size_t size);
/* Returns NULL when count * size overflows. */
void *keel__calloc(size_t count, size_t size);
void keel__free(void *ptr);
/* Returns a copy of s (NULL for NULL s or on allocation failure). */
char *keel__strdup(const char *s);
char *keel__strndup(const char *s, size_t len);

#endif
