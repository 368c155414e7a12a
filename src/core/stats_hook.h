/* The link between an object that can be shown by a keel_serve server and
 * the registrations that show it. An object keeps one keel__stats_hooks
 * (zeroed with the object) and calls keel__stats_hooks_detach() when its
 * close begins: every registration is dropped from its server then, so a
 * server never reads a closing object. A server that closes first unlinks
 * its registrations from the object's list. Loop thread only. */
#ifndef KEEL_CORE_STATS_HOOK_H
#define KEEL_CORE_STATS_HOOK_H

typedef struct keel__stats_hook keel__stats_hook;

struct keel__stats_hook {
  keel__stats_hook *next;
  keel__stats_hook **pprev;               /* the pointer that points at this hook */
  void (*detach)(keel__stats_hook *hook); /* called once; must unlink and may free */
};

typedef struct keel__stats_hooks {
  keel__stats_hook *head;
} keel__stats_hooks;

/* Links hook into hooks (front). */
void keel__stats_hook_link(keel__stats_hooks *hooks, keel__stats_hook *hook);
/* Unlinks hook from whatever list holds it (no-op when unlinked). */
void keel__stats_hook_unlink(keel__stats_hook *hook);
/* Calls every hook's detach (each unlinks itself); NULL-safe. */
void keel__stats_hooks_detach(keel__stats_hooks *hooks);

/* Implemented by src/serve: registers obj with server s (a keel_serve *)
 * and links the registration into hooks, so that the object's close drops
 * it. Same returns as keel_serve_register(). */
struct keel_serve;
struct keel_stats_source;
int keel__serve_register_hooked(struct keel_serve *s, const struct keel_stats_source *src,
                                const void *obj, const char *name, keel__stats_hooks *hooks);

#endif
