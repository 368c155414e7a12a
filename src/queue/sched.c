#include "queue/sched.h"

#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/alloc.h"

/* Chunks of slots come in groups that double up to KEEL__SLAB_GROUP_MAX
 * chunks (1, 1, 2, 4, ... 32, then 64 at a time): a big queue's slots sit in
 * few large blocks, which the kernel can back with huge pages, so a million
 * fresh slots cost a few page faults instead of ten thousand. Chunk c starts
 * a group (and owns its block) when it is 0 or a power of two below the
 * maximum, or a multiple of the maximum. */
#define KEEL__SLAB_GROUP_MAX 64u

static uint32_t group_size_at(uint32_t chunk) {
  if (chunk == 0) return 1;
  if (chunk < KEEL__SLAB_GROUP_MAX) return (chunk & (chunk - 1)) == 0 ? chunk : 0;
  return chunk % KEEL__SLAB_GROUP_MAX == 0 ? KEEL__SLAB_GROUP_MAX : 0;
}

/* Advice only: asks for huge pages on the 2 MiB-aligned interior of a block
 * (whatever allocator it came from; an error changes nothing). */
static void advise_huge_pages(void *block, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  uintptr_t start = ((uintptr_t)block + huge - 1) & ~(huge - 1);
  uintptr_t end = ((uintptr_t)block + bytes) & ~(huge - 1);
  if (end > start) (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
  (void)block;
  (void)bytes;
#endif
}

void keel__sched_init(keel__sched *s) {
  memset(s, 0, sizeof *s);
  s->free_head = KEEL__NIL;
}

void keel__sched_free(keel__sched *s) {
  for (uint32_t c = 0; c < s->chunk_count; c++) {
    if (s->overrides[c] != NULL)
      for (uint32_t i = 0; i < KEEL__SLAB_CHUNK; i++) keel__free(s->overrides[c][i]);
    keel__free(s->overrides[c]);
    if (group_size_at(c) != 0) keel__free(s->chunks[c]); /* the group's block */
  }
  keel__free(s->overrides);
  keel__free(s->chunks);
  for (uint32_t l = 0; l < s->level_cap; l++) keel__free(s->levels[l].ring);
  keel__free(s->levels);
  keel__free(s->heap);
  keel__sched_init(s);
}

uint32_t keel__sched_alloc(keel__sched *s) {
  uint32_t index = s->free_head;
  if (index != KEEL__NIL) {
    keel__job_slot *slot = keel__slot(s, index);
    s->free_head = slot->link.next;
    slot->generation++;
    return index;
  }
  /* The last chunk ends below KEEL__NIL - 1, so ids never collide with NIL. */
  if (s->slot_count >= KEEL__NIL - KEEL__SLAB_CHUNK) return KEEL__NIL;
  if ((s->slot_count & (KEEL__SLAB_CHUNK - 1)) == 0) {
    /* A new chunk; slots never move, so pointers to them stay valid. The
     * retry heap grows with it so that a retry never needs memory. */
    uint32_t need = (s->chunk_count + 1) * KEEL__SLAB_CHUNK;
    if (s->heap_cap < need) {
      /* Doubling: a million pushes copy the heap a few times, not 250. */
      uint32_t cap =
          s->heap_cap >= need / 2 && s->heap_cap <= UINT32_MAX / 2 ? s->heap_cap * 2 : need;
      uint32_t *heap = keel__realloc(s->heap, (size_t)cap * sizeof *heap);
      if (heap == NULL) return KEEL__NIL;
      s->heap = heap;
      s->heap_cap = cap;
    }
    keel__job_slot **chunks = keel__realloc(s->chunks, (s->chunk_count + 1) * sizeof *chunks);
    if (chunks == NULL) return KEEL__NIL;
    s->chunks = chunks;
    keel__job_overrides ***ov = keel__realloc(s->overrides, (s->chunk_count + 1) * sizeof *ov);
    if (ov == NULL) return KEEL__NIL;
    s->overrides = ov;
    /* Not zeroed: a slot's fields are set when it is first handed out. */
    uint32_t group = group_size_at(s->chunk_count);
    keel__job_slot *chunk;
    if (group != 0) {
      size_t bytes = (size_t)group * KEEL__SLAB_CHUNK * sizeof *chunk;
      chunk = keel__malloc(bytes);
      if (chunk == NULL) return KEEL__NIL;
      if (group > 1) advise_huge_pages(chunk, bytes);
    } else {
      chunk = s->chunks[s->chunk_count - 1] + KEEL__SLAB_CHUNK; /* next in its group */
    }
    s->overrides[s->chunk_count] = NULL;
    s->chunks[s->chunk_count++] = chunk;
  }
  index = s->slot_count++;
  keel__job_slot *slot = keel__slot(s, index);
  memset(slot, 0, sizeof *slot);
  slot->generation = 1;
  return index;
}

void keel__sched_release(keel__sched *s, uint32_t index) {
  keel__job_slot *slot = keel__slot(s, index);
  if (slot->has_overrides) {
    keel__job_overrides **entry =
        &s->overrides[index >> KEEL__SLAB_CHUNK_BITS][index & (KEEL__SLAB_CHUNK - 1)];
    keel__free(*entry);
    *entry = NULL;
    slot->has_overrides = 0;
  }
  slot->payload = NULL;
  slot->state = KEEL__JOB_FREE;
  slot->attempts = 0;
  slot->last_delay_ms = 0;
  slot->link.next = s->free_head;
  s->free_head = index;
}

_Static_assert(sizeof(keel__job_slot) == 40, "a job slot stays 40 bytes");

int keel__sched_set_overrides(keel__sched *s, uint32_t index, keel__job_overrides *ov) {
  keel__job_overrides ***table = &s->overrides[index >> KEEL__SLAB_CHUNK_BITS];
  if (*table == NULL) {
    if (ov == NULL) return 0;
    *table = keel__calloc(KEEL__SLAB_CHUNK, sizeof **table);
    if (*table == NULL) return UV_ENOMEM;
  }
  (*table)[index & (KEEL__SLAB_CHUNK - 1)] = ov;
  keel__slot(s, index)->has_overrides = ov != NULL;
  return 0;
}

uint32_t keel__sched_lookup(const keel__sched *s, uint64_t id) {
  uint64_t low = id & 0xFFFFFFFFu;
  if (low == 0 || low > s->slot_count) return KEEL__NIL;
  uint32_t index = (uint32_t)(low - 1);
  const keel__job_slot *slot = keel__slot(s, index);
  if (slot->generation != (uint32_t)(id >> 32) || slot->state == KEEL__JOB_FREE) return KEEL__NIL;
  return index;
}

/* Index of the level with this priority, or where it would be inserted. */
static uint32_t level_search(const keel__sched *s, int32_t priority, bool *found) {
  uint32_t low = 0, high = s->level_count;
  /* Levels are sorted by ascending priority: the highest is last, so the
   * level that empties most often is removed without moving the others. */
  while (low < high) {
    uint32_t mid = low + (high - low) / 2;
    if (s->levels[mid].priority == priority) {
      *found = true;
      return mid;
    }
    if (s->levels[mid].priority < priority)
      low = mid + 1;
    else
      high = mid;
  }
  *found = false;
  return low;
}

static int ring_grow(keel__level *level) {
  uint32_t cap = level->mask ? (level->mask + 1) * 2 : 16;
  if (cap == 0) return UV_ENOMEM;
  uint32_t *ring = keel__malloc((size_t)cap * sizeof *ring);
  if (ring == NULL) return UV_ENOMEM;
  /* Unwrap the old ring into the new one, oldest first. */
  for (uint32_t i = 0; i < level->count; i++)
    ring[i] = level->ring[(level->head + i) & level->mask];
  keel__free(level->ring);
  level->ring = ring;
  level->head = 0;
  level->mask = cap - 1;
  return 0;
}

int keel__sched_enqueue(keel__sched *s, uint32_t index) {
  keel__job_slot *slot = keel__slot(s, index);
  bool found;
  uint32_t at = level_search(s, slot->priority, &found);
  if (!found) {
    if (s->level_count == s->level_cap) {
      uint32_t cap = s->level_cap ? s->level_cap * 2 : 8;
      keel__level *levels = keel__realloc(s->levels, cap * sizeof *levels);
      if (levels == NULL) return UV_ENOMEM;
      memset(&levels[s->level_cap], 0, (cap - s->level_cap) * sizeof *levels);
      s->levels = levels;
      s->level_cap = cap;
    }
    /* The entry past the last level is a spare (maybe with a ring): it
     * becomes the new level, the others move up by one. */
    keel__level spare = s->levels[s->level_count];
    if (spare.mask == 0 && ring_grow(&spare) != 0) return UV_ENOMEM;
    memmove(&s->levels[at + 1], &s->levels[at], (s->level_count - at) * sizeof *s->levels);
    spare.priority = slot->priority;
    spare.head = spare.count = spare.cancelled = 0;
    s->levels[at] = spare;
    s->level_count++;
  }
  keel__level *level = &s->levels[at];
  if (level->count > level->mask && ring_grow(level) != 0) {
    if (level->count == 0) { /* just created: remove it again, keeping its ring */
      keel__level empty = *level;
      memmove(&s->levels[at], &s->levels[at + 1], (s->level_count - at - 1) * sizeof *s->levels);
      s->level_count--;
      s->levels[s->level_count] = empty;
    }
    return UV_ENOMEM;
  }
  level->ring[(level->head + level->count) & level->mask] = index;
  level->count++;
  slot->state = KEEL__JOB_PENDING;
  s->pending++;
  return 0;
}

/* How many pops ahead the slot is prefetched. */
#define KEEL__PREFETCH_AHEAD 8

uint32_t keel__sched_pop(keel__sched *s) {
  while (s->level_count > 0) {
    keel__level *level = &s->levels[s->level_count - 1];
    uint32_t index = level->ring[level->head];
    level->head = (level->head + 1) & level->mask;
    if (--level->count == 0)
      s->level_count--; /* the entry stays as a spare, with its ring */
    else if (level->count > KEEL__PREFETCH_AHEAD)
      __builtin_prefetch(
          keel__slot(s, level->ring[(level->head + KEEL__PREFETCH_AHEAD) & level->mask]), 1);
    keel__job_slot *slot = keel__slot(s, index);
    if (slot->state == KEEL__JOB_CANCELLED) {
      s->cancelled--;
      if (level->cancelled > 0) level->cancelled--;
      keel__sched_release(s, index);
      continue;
    }
    s->pending--;
    return index;
  }
  return KEEL__NIL;
}

void keel__sched_cancel_pending(keel__sched *s, uint32_t index) {
  keel__job_slot *slot = keel__slot(s, index);
  slot->state = KEEL__JOB_CANCELLED;
  slot->payload = NULL;
  s->pending--;
  s->cancelled++;
  bool found;
  uint32_t at = level_search(s, slot->priority, &found);
  if (found) s->levels[at].cancelled++;
}

/* Removes one entry from a level's ring (order of the others kept); drops
 * the level when it empties, keeping its ring as a spare. */
static void level_remove(keel__sched *s, uint32_t at, uint32_t index) {
  keel__level *level = &s->levels[at];
  uint32_t i = 0;
  while (i < level->count && level->ring[(level->head + i) & level->mask] != index) i++;
  if (i == level->count) return;
  for (; i + 1 < level->count; i++)
    level->ring[(level->head + i) & level->mask] = level->ring[(level->head + i + 1) & level->mask];
  if (--level->count == 0) {
    keel__level empty = *level;
    memmove(&s->levels[at], &s->levels[at + 1], (s->level_count - at - 1) * sizeof *s->levels);
    s->level_count--;
    s->levels[s->level_count] = empty;
  }
}

int keel__sched_reprioritize(keel__sched *s, uint32_t index, int32_t priority) {
  keel__job_slot *slot = keel__slot(s, index);
  int32_t old = slot->priority;
  if (old == priority) return 0;
  /* Join the new level first (the only step that can fail), then leave the
   * old one. */
  slot->priority = priority;
  if (keel__sched_enqueue(s, index) != 0) {
    slot->priority = old;
    return UV_ENOMEM;
  }
  s->pending--; /* counted once, not twice */
  bool found;
  uint32_t at = level_search(s, old, &found);
  if (found) level_remove(s, at, index);
  return 0;
}

uint64_t keel__sched_count_priority(const keel__sched *s, int32_t priority) {
  bool found;
  uint32_t at = level_search(s, priority, &found);
  return found ? s->levels[at].count - s->levels[at].cancelled : 0;
}

/* ---- retry heap ------------------------------------------------------- */

static bool due_before(const keel__sched *s, uint32_t a, uint32_t b) {
  return keel__slot(s, a)->at.due_ms < keel__slot(s, b)->at.due_ms;
}

static void heap_set(keel__sched *s, uint32_t pos, uint32_t index) {
  s->heap[pos] = index;
  keel__slot(s, index)->link.heap_pos = pos;
}

static void sift_up(keel__sched *s, uint32_t pos) {
  uint32_t index = s->heap[pos];
  while (pos > 0) {
    uint32_t parent = (pos - 1) / 2;
    if (!due_before(s, index, s->heap[parent])) break;
    heap_set(s, pos, s->heap[parent]);
    pos = parent;
  }
  heap_set(s, pos, index);
}

static void sift_down(keel__sched *s, uint32_t pos) {
  uint32_t index = s->heap[pos];
  for (;;) {
    uint32_t child = 2 * pos + 1;
    if (child >= s->heap_count) break;
    if (child + 1 < s->heap_count && due_before(s, s->heap[child + 1], s->heap[child])) child++;
    if (!due_before(s, s->heap[child], index)) break;
    heap_set(s, pos, s->heap[child]);
    pos = child;
  }
  heap_set(s, pos, index);
}

void keel__sched_wait(keel__sched *s, uint32_t index, uint64_t due_ms) {
  /* heap_cap covers every slot ever created (see keel__sched_alloc). */
  keel__job_slot *slot = keel__slot(s, index);
  slot->state = KEEL__JOB_WAITING;
  slot->at.due_ms = due_ms;
  heap_set(s, s->heap_count++, index);
  sift_up(s, s->heap_count - 1);
}

void keel__sched_unwait(keel__sched *s, uint32_t index) {
  uint32_t pos = keel__slot(s, index)->link.heap_pos;
  uint32_t last = s->heap[--s->heap_count];
  if (pos == s->heap_count) return;
  heap_set(s, pos, last);
  if (pos > 0 && due_before(s, last, s->heap[(pos - 1) / 2]))
    sift_up(s, pos);
  else
    sift_down(s, pos);
}

uint32_t keel__sched_next_due(const keel__sched *s) {
  return s->heap_count == 0 ? KEEL__NIL : s->heap[0];
}
