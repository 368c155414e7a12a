#!/usr/bin/env python3
"""keel_serve against the real consumers: promtool, a Prometheus server and
headless Chromium, all on examples/dashboard (which uses every module).

usage: external.py DASHBOARD_BINARY [--screenshot PATH]
Needs KEEL_TEST_PG (scripts/test exports it). Skips (exit 77) when
promtool, prometheus or chromium is missing.
"""
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

SKIP = 77


T0 = time.time()


def log(*a):
    print('[serve-external %5.1fs]' % (time.time() - T0), *a, flush=True)


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http(url, method='GET', timeout=5):
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_for(what, fn, timeout):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
            last = v
        except Exception as e:  # noqa: BLE001 - retried until timeout
            last = e
        time.sleep(0.1)
    raise AssertionError('timed out waiting for %s (last: %r)' % (what, last))


class WS:
    """Minimal WebSocket client (RFC 6455) for the DevTools protocol."""

    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.s = socket.create_connection((u.hostname, u.port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(('GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n'
                        'Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n'
                        'Sec-WebSocket-Version: 13\r\n\r\n' % (u.path, u.hostname, u.port, key)).encode())
        head = b''
        while b'\r\n\r\n' not in head:
            c = self.s.recv(1)
            if not c:
                raise ConnectionError('handshake')
            head += c
        if b' 101 ' not in head.split(b'\r\n')[0]:
            raise ConnectionError(head)
        self.next_id = 0

    def _recv_n(self, n):
        b = b''
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise ConnectionError('closed')
            b += c
        return b

    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            hdr = struct.pack('!BB', 0x81, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack('!BBH', 0x81, 0x80 | 126, n)
        else:
            hdr = struct.pack('!BBQ', 0x81, 0x80 | 127, n)
        self.s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        msg = b''
        while True:
            b0, b1 = self._recv_n(2)
            n = b1 & 0x7f
            if n == 126:
                n = struct.unpack('!H', self._recv_n(2))[0]
            elif n == 127:
                n = struct.unpack('!Q', self._recv_n(8))[0]
            msg += self._recv_n(n)
            if b0 & 0x80:
                return msg.decode()

    def call(self, method, **params):
        self.next_id += 1
        my = self.next_id
        self.send(json.dumps({'id': my, 'method': method, 'params': params}))
        while True:
            m = json.loads(self.recv())
            if m.get('id') == my:
                if 'error' in m:
                    raise RuntimeError(m['error'])
                return m['result']


def main():
    binary = sys.argv[1]
    shot = None
    if '--screenshot' in sys.argv:
        shot = sys.argv[sys.argv.index('--screenshot') + 1]
    tools = {t: shutil.which(t) for t in ('promtool', 'prometheus', 'chromium')}
    if not all(tools.values()):
        log('skipped: missing', [t for t, p in tools.items() if not p])
        return SKIP
    if not os.environ.get('KEEL_TEST_PG'):
        log('skipped: KEEL_TEST_PG not set')
        return SKIP
    tmp = tempfile.mkdtemp(prefix='keel-serve-')
    procs = []
    try:
        demo = subprocess.Popen([binary, '--seconds', '60'], stdout=subprocess.PIPE, text=True)
        procs.append(demo)
        first = demo.stdout.readline().strip()
        assert first.startswith('dashboard: http://127.0.0.1:'), first
        base = first.split(' ', 1)[1].rstrip('/')
        port = int(base.rsplit(':', 1)[1])
        log('demo at', base)
        # Prometheus and Chromium start slowly: both start now, in parallel
        pport = free_port()
        cfg = os.path.join(tmp, 'prometheus.yml')
        with open(cfg, 'w') as f:
            f.write('global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n'
                    'scrape_configs:\n  - job_name: keel\n    static_configs:\n'
                    '      - targets: ["127.0.0.1:%d"]\n' % port)
        prom = subprocess.Popen([tools['prometheus'], '--config.file=' + cfg,
                                 '--storage.tsdb.path=' + os.path.join(tmp, 'tsdb'),
                                 '--web.listen-address=127.0.0.1:%d' % pport, '--log.level=warn'],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(prom)
        devtools_dir = os.path.join(tmp, 'chromium')
        chrome = subprocess.Popen([tools['chromium'], '--headless=new', '--no-sandbox', '--disable-gpu',
                                   '--no-first-run', '--disable-extensions', '--window-size=1400,1000',
                                   '--remote-debugging-port=0', '--user-data-dir=' + devtools_dir,
                                   'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(chrome)
        wait_for('activity', lambda: b'keel_listener_delivered_total{name="orders"} 0' not in
                 http(base + '/metrics') and b'keel_listener_delivered_total' in http(base + '/metrics'), 15)

        # 1. promtool check metrics on the text with every kind registered
        text = http(base + '/metrics')
        for kind in (b'keel_breaker_', b'keel_queue_', b'keel_pg_connected', b'keel_pg_pool_',
                     b'keel_listener_', b'keel_verifier_', b'keel_integrity_', b'keel_build_info'):
            assert kind in text, kind
        r = subprocess.run([tools['promtool'], 'check', 'metrics'], input=text, capture_output=True)
        log('promtool check metrics: exit', r.returncode, (r.stdout + r.stderr).decode().strip())
        assert r.returncode == 0

        # 2. headless Chromium: a state change after the page loaded arrives over /ws
        active = os.path.join(devtools_dir, 'DevToolsActivePort')
        cport = int(wait_for('DevToolsActivePort', lambda: os.path.exists(active) and
                             open(active).readline().strip(), 30))
        target = json.loads(http('http://127.0.0.1:%d/json/new?%s' % (cport, urllib.parse.quote(base + '/', safe='')),
                                 method='PUT'))
        ws = WS(target['webSocketDebuggerUrl'])
        expr = ("(() => { const e = document.querySelector('#obj-breaker-payments .state');"
                " return e ? e.textContent : ''; })()")
        state = lambda: ws.call('Runtime.evaluate', expression=expr)['result'].get('value', '')
        before = wait_for('the payments card', state, 20)
        log('page shows payments breaker:', before)
        assert before != 'forced_open'
        demo.send_signal(signal.SIGUSR1)  # keel_breaker_force_open()
        after = wait_for('forced_open in the DOM', lambda: state() == 'forced_open' and 'forced_open', 10)
        log('page shows payments breaker after the signal:', after)
        count = ws.call('Runtime.evaluate', expression="document.querySelectorAll('.card').length")
        log('cards on the page:', count['result']['value'])
        assert count['result']['value'] >= 7
        if shot:
            time.sleep(float(os.environ.get('KEEL_SCREENSHOT_WAIT', '1')))  # deltas for the sparklines
            png = ws.call('Page.captureScreenshot', format='png')['data']
            with open(shot, 'wb') as f:
                f.write(base64.b64decode(png))
            log('screenshot saved to', shot)

        # 3. a real Prometheus scrapes keel; PromQL returns keel's value
        demo.send_signal(signal.SIGUSR2)  # stop calling the breaker: its counters hold still
        time.sleep(0.3)
        stats = json.loads(http(base + '/stats.json'))
        payments = [o for o in stats['objects'] if o['kind'] == 'breaker' and o['name'] == 'payments'][0]
        rejected = payments['stats']['calls_rejected']
        assert rejected > 0, payments
        q = urllib.parse.quote('keel_breaker_calls_rejected_total{name="payments",job="keel"}')

        def query():
            r = json.loads(http('http://127.0.0.1:%d/api/v1/query?query=%s' % (pport, q)))
            res = r['data']['result']
            return res and float(res[0]['value'][1])
        # the latest scrape after the counters stopped moving has keel's value
        got = wait_for('Prometheus to scrape keel', lambda: query() == rejected and query(), 30)
        log('PromQL keel_breaker_calls_rejected_total{name="payments"} =', got, '; /stats.json says', rejected)
        assert got == rejected, (got, rejected)
        up = json.loads(http('http://127.0.0.1:%d/api/v1/query?query=up' % pport))['data']['result']
        assert up and up[0]['value'][1] == '1', up
        demo.send_signal(signal.SIGTERM)  # clean shutdown: exit 0, no leak under ASan
        rc = demo.wait(timeout=30)
        assert rc == 0, 'demo exited with %d' % rc
        log('ok')
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if procs and procs[0].returncode not in (0, None, -signal.SIGTERM):
            log('demo exited with', procs[0].returncode)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
