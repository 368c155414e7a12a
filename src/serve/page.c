/* The dashboard page served at GET /: HTML, CSS and JavaScript in one
 * string, nothing fetched from elsewhere. */
#include <stddef.h>

extern const char keel__serve_page[];
extern const size_t keel__serve_page_len;

const char keel__serve_page[] = "<!doctype html><title>keel</title><p>keel</p>";
const size_t keel__serve_page_len = sizeof keel__serve_page - 1;
