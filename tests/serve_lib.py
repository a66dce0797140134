"""serve_lib.py: start blip-serve on an ephemeral loopback port and talk to
it, for the serve tests (standard library only)."""
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import time
import atexit

_running = []
all_logs = []  # every server's log, for the sanitizer check


@atexit.register
def _kill_left():
    """A failed check must not leave servers behind."""
    for p in _running:
        if p.poll() is None:
            p.kill()


class Server:
    """blip-serve --listen 127.0.0.1:0 ...; .port, .get(), .post(), .stop()."""

    def __init__(self, binary, db, model, *args, log=None, env=None):
        self.log_path = log or os.path.join(db + ".serve.log")
        self.logf = open(self.log_path, "ab")
        all_logs.append(self.log_path)
        cmd = [binary, "--db", db, "--model", model]
        if not any(a.startswith("--listen") for a in args):
            cmd += ["--listen", "127.0.0.1:0"]
        self.p = subprocess.Popen(cmd + list(args), stdout=subprocess.PIPE, stderr=self.logf, env=env)
        _running.append(self.p)
        self.port = None
        line = b""
        deadline = time.time() + 60
        while time.time() < deadline:
            r, _, _ = select.select([self.p.stdout], [], [], 1)
            if r:
                line = self.p.stdout.readline()
                break
            if self.p.poll() is not None:
                break
        if b"listening on" not in line:
            self.p.kill()
            raise RuntimeError("blip-serve did not start: %r, log: %s" % (line, open(self.log_path).read()[-2000:]))
        host, port = line.split(b"http://")[1].split(b"/")[0].decode().rsplit(":", 1)
        self.port = int(port)
        self.host = "127.0.0.1" if host == "0.0.0.0" else "::1" if host == "[::]" else host.strip("[]")

    def request(self, method, path, body=None, headers=None, timeout=120):
        c = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def get(self, path, headers=None):
        return self.request("GET", path, headers=headers)

    def json(self, method, path, body=None, headers=None):
        st, h, d = self.request(method, path, body, headers)
        return st, h, json.loads(d) if d else None

    def raw(self, data, timeout=10):
        """Send raw bytes, return the raw answer (until close or timeout)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and closed: read what it said
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
                if b"\r\n\r\n" in out and b"Content-Length" not in out.split(b"\r\n\r\n")[0]:
                    break
                head, _, rest = out.partition(b"\r\n\r\n")
                for l in head.split(b"\r\n"):
                    if l.lower().startswith(b"content-length:") and len(rest) >= int(l.split(b":")[1]):
                        s.close()
                        return out
        except (socket.timeout, ConnectionResetError):
            pass
        s.close()
        return out

    def stop(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)
        try:
            rc = self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = "killed"
        self.logf.close()
        return rc

    def log(self):
        return open(self.log_path, errors="replace").read()


def multipart(fields, files):
    """(body, content_type) for form fields [(name, value)] and files [(name, filename, bytes)]."""
    b = "----blipsearch-test-boundary-7MA4YWxkTrZu0gW"
    out = b""
    for k, v in fields:
        out += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (b, k, v)).encode()
    for k, fn, data in files:
        out += ("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n" % (b, k, fn)).encode() + data + b"\r\n"
    out += ("--%s--\r\n" % b).encode()
    return out, "multipart/form-data; boundary=" + b


def sanitizer_reports():
    """ASan/UBSan/LSan lines in the logs of every server started so far."""
    out = []
    for p in all_logs:
        for l in open(p, errors="replace"):
            if "AddressSanitizer" in l or "LeakSanitizer" in l or "runtime error:" in l:
                out.append(p + ": " + l.strip())
    return out
