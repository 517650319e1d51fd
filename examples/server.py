"""A small dev server for trying agent-exec's agent loop (see the README).

It prints ``booting``, starts listening a second later and says
``listening on :PORT``, then asks itself for /health every half second and
logs each request as ``GET /health 200``, as dev servers log their traffic.

    agent-exec run --ready-match 'listening on' -- python3 -u examples/server.py 8000

Run it with ``-u`` (or PYTHONUNBUFFERED=1): through a pipe Python buffers
its stdout in 8 KiB blocks, and the lines would reach the job's log only
when the buffer fills or the server exits.
"""

import http.server
import sys
import threading
import time
import urllib.request


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok\n" if code == 200 else b"not found\n")
        print("GET %s %d" % (self.path, code))

    def log_message(self, *args):  # the default goes to stderr, with dates
        pass


def health_checks(port: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=5).read()
        except OSError as e:
            print("health check failed: %s" % e, file=sys.stderr)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    print("booting")
    time.sleep(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening on :%d" % port)
    threading.Thread(target=health_checks, args=(port,), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
