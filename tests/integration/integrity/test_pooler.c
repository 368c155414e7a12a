#include <criterion/criterion.h>
#include "support/harness.h"
Test(integrity_pooler, placeholder) {}
