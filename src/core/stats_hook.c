#include "core/stats_hook.h"

#include <stddef.h>

void keel__stats_hook_link(keel__stats_hooks *hooks, keel__stats_hook *hook) {
  hook->next = hooks->head;
  if (hook->next != NULL) hook->next->pprev = &hook->next;
  hook->pprev = &hooks->head;
  hooks->head = hook;
}

void keel__stats_hook_unlink(keel__stats_hook *hook) {
  if (hook->pprev == NULL) return;
  *hook->pprev = hook->next;
  if (hook->next != NULL) hook->next->pprev = hook->pprev;
  hook->next = NULL;
  hook->pprev = NULL;
}

void keel__stats_hooks_detach(keel__stats_hooks *hooks) {
  if (hooks == NULL) return;
  while (hooks->head != NULL) {
    keel__stats_hook *h = hooks->head;
    keel__stats_hook_unlink(h);
    if (h->detach != NULL) h->detach(h);
  }
}
