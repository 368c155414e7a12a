#!/usr/bin/env python3
"""Writes page.html as a C string (keel__serve_page) for the dashboard."""
import sys

src, out = sys.argv[1], sys.argv[2]
data = open(src, 'rb').read()
lines = ['/* Generated from src/serve/page.html by src/serve/embed.py: do not edit. */',
         '#include <stddef.h>', '',
         'extern const char keel__serve_page[];', 'extern const size_t keel__serve_page_len;', '',
         'const char keel__serve_page[] = {']
data += b'\0'
for i in range(0, len(data), 16):
    lines.append('    ' + ', '.join('%d' % (b - 256 if b > 127 else b) for b in data[i:i + 16]) + ',')
lines.append('};')
lines.append('const size_t keel__serve_page_len = sizeof keel__serve_page - 1;')
open(out, 'w').write('\n'.join(lines) + '\n')
