"""
A fake Hugging Face Hub on 127.0.0.1 (Python standard library only), for testing download code offline.

It serves local folders as model repos with the endpoints huggingface_hub (tested with 2.4) uses for
snapshot_download, hf_hub_download, get_hf_file_metadata, list_repo_files/list_repo_tree and model_info:

  GET  /api/models/{repo}[/revision/{rev}]      model info: id, sha, siblings
  GET  /api/models/{repo}/tree/{rev}[/{path}]   tree listing (?recursive=true), with lfs {oid, size} for LFS files
  HEAD|GET /{repo}/resolve/{rev}/{path}         small files: 200, ETag (git blob sha1), X-Repo-Commit, Content-Length;
                                                LFS files (.safetensors .bin .ckpt .onnx ..., or > 10 MB): 302 to
                                                the "CDN" (a second port, so a different origin, as on the real Hub)
                                                with X-Linked-Etag (sha256), X-Linked-Size, X-Repo-Commit
  GET  {cdn}/blob/{sha256}?repo=..&path=..      the LFS file's bytes (Range honoured: resumed downloads)
  GET  /api/agent-harnesses                     huggingface_hub 2.x's user-agent registry: an empty one
  Errors as the Hub sends them: 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound.

Every request is recorded in `hub.log` as (method, path, status); `hub.downloads(since)` lists the repo files whose
bytes were sent (GET on resolve or on the CDN). `hub.faults[(repo_id, path)] = "500"` makes that file's download
answer 500; "cut" sends half the bytes and closes the connection, every time (huggingface_hub resumes 5 times).

    from fake_hub import FakeHub
    with FakeHub({"owner/name": "/path/to/folder"}) as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=tmp)
        env.pop("HF_HUB_OFFLINE", None)
        subprocess.run([sys.executable, "-c", "..."], env=env)   # huggingface_hub reads HF_ENDPOINT on import
        assert not [f for f in hub.downloads() if f.endswith(".bin")]
"""

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".onnx", ".pt", ".pth", ".h5", ".msgpack", ".pb", ".gguf")
LFS_MIN_SIZE = 10 * 2 ** 20


class Repo:
    """A folder read once into memory: {path: bytes}, with git blob ids, sha256 and a fixed commit hash."""

    def __init__(self, repo_id, folder):
        self.id, self.folder, self.files = repo_id, folder, {}
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if d != ".git")
            for n in sorted(names):
                full = os.path.join(root, n)
                with open(full, "rb") as f:
                    self.files[os.path.relpath(full, folder).replace(os.sep, "/")] = f.read()
        self.meta = {}
        for path, data in self.files.items():
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.meta[path] = dict(size=len(data), oid=blob, lfs=hashlib.sha256(data).hexdigest() if lfs else None)
        self.sha = hashlib.sha1(json.dumps({p: m["oid"] for p, m in self.meta.items()}, sort_keys=True)
                                .encode()).hexdigest()

    def resolve(self, rev):
        return self.sha if rev in ("main", self.sha) else None

    def tree(self, prefix, recursive):
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for path, m in self.meta.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(2, len(parts))):
                d = "/".join(([prefix] if prefix else []) + parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    out.append(dict(type="directory", oid=hashlib.sha1(d.encode()).hexdigest(), size=0, path=d))
            if not recursive and len(parts) > 1:
                continue
            entry = dict(type="file", oid=m["oid"], size=m["size"], path=path)
            if m["lfs"]:
                entry["lfs"] = dict(oid=m["lfs"], size=m["size"], pointerSize=134)
            out.append(entry)
        return out


class FakeHub:
    def __init__(self, repos):
        self.repos = {rid: Repo(rid, folder) for rid, folder in repos.items()}
        self.log, self.faults = [], {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = self.cdn.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"

    def start(self):
        for s in (self.server, self.cdn):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        return self

    def stop(self):
        for s in (self.server, self.cdn):
            s.shutdown()
            s.server_close()

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()

    def record(self, method, path, status):
        with self._lock:
            self.log.append((method, path, status))

    def downloads(self, since=0):
        """Repo files ("repo_id:path") whose bytes were sent (200/206, or cut short by a fault), in order, from
        request number `since` of the log on (n = len(hub.log) before a call, then hub.downloads(n))."""
        out = []
        for method, path, status in self.log[since:]:
            if method != "GET" or status not in (200, 206, "cut"):
                continue
            if path.startswith("/blob/"):
                q = parse_qs(urlsplit(path).query)
                out.append(f"{q['repo'][0]}:{q['path'][0]}")
            elif "/resolve/" in path:
                rid, _, rest = path.lstrip("/").partition("/resolve/")
                out.append(f"{rid}:{unquote(rest.partition('/')[2])}")
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None  # set by FakeHub

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.handle_any(head=True)

    def do_GET(self):
        self.handle_any(head=False)

    def send(self, status, body=b"", headers=(), head=False, length=None):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        self.hub.record(self.command, self.path, status)

    def error(self, status, code, message, commit=None, head=False):
        headers = [("X-Error-Code", code), ("X-Error-Message", message), ("Content-Type", "application/json")]
        if commit:
            headers.append(("X-Repo-Commit", commit))
        self.send(status, json.dumps({"error": message}).encode(), headers, head)

    def json(self, obj, head=False):
        self.send(200, json.dumps(obj).encode(), [("Content-Type", "application/json")], head)

    def find_repo(self, parts):
        """(repo, rest of the path parts) for owner/name at the start of parts."""
        if len(parts) >= 2 and "/".join(parts[:2]) in self.hub.repos:
            return self.hub.repos["/".join(parts[:2])], parts[2:]
        return None, parts[2:]

    def handle_any(self, head):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if self.server is self.hub.cdn:
            return self.serve_blob(parts, query, head)
        if parts[:2] == ["api", "agent-harnesses"]:
            return self.json({"standardEnvVars": [], "harnesses": {}}, head)
        if parts[:2] == ["api", "models"]:
            repo, rest = self.find_repo(parts[2:])
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found", head=head)
            if not rest or rest[0] == "revision":
                sha = repo.resolve(rest[1] if len(rest) > 1 else "main")
                if sha is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id", head=head)
                return self.json(dict(_id=sha[:24], id=repo.id, modelId=repo.id, sha=sha, private=False,
                                      gated=False, disabled=False, lastModified="2024-01-01T00:00:00.000Z",
                                      tags=[], siblings=[{"rfilename": p} for p in repo.files]), head)
            if rest[0] == "tree" and len(rest) >= 2:
                sha = repo.resolve(rest[1])
                if sha is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id", head=head)
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                return self.json(repo.tree("/".join(rest[2:]), recursive), head)
            return self.error(404, "NotFound", f"no such endpoint {url.path}", head=head)
        repo, rest = self.find_repo(parts)
        if len(rest) >= 2 and rest[0] == "resolve":
            if repo is None:
                return self.error(404, "RepoNotFound", "Repository not found", head=head)
            sha = repo.resolve(rest[1])
            if sha is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id", head=head)
            path = "/".join(rest[2:])
            if path not in repo.files:
                return self.error(404, "EntryNotFound", f"{path} does not exist on main", commit=sha, head=head)
            m = repo.meta[path]
            if m["lfs"]:  # the Hub's redirect to its CDN, with the file's metadata on the redirect itself
                where = f"{self.hub.cdn_url}/blob/{m['lfs']}?repo={quote(repo.id, safe='')}&path={quote(path, safe='')}"
                return self.send(302, b"", [("Location", where),
                                            ("X-Repo-Commit", sha), ("X-Linked-Etag", f'"{m["lfs"]}"'),
                                            ("X-Linked-Size", str(m["size"])), ("ETag", f'"{m["oid"]}"')],
                                 head)
            fault = self.hub.faults.get((repo.id, path))
            if fault and not head:
                return self.apply_fault(fault, repo, path, repo.files[path], [])
            return self.send(200, repo.files[path], [("X-Repo-Commit", sha), ("ETag", f'"{m["oid"]}"'),
                                                     ("Content-Type", "application/octet-stream")], head)
        return self.error(404, "NotFound", f"no such endpoint {url.path}", head=head)

    def serve_blob(self, parts, query, head):
        """The CDN: /blob/{sha256}?repo=...&path=... (as a signed URL would, the query names the file)."""
        repo = self.hub.repos.get(query.get("repo", [""])[0])
        path = query.get("path", [""])[0]
        if len(parts) != 2 or parts[0] != "blob" or repo is None or repo.meta.get(path, {}).get("lfs") != parts[1]:
            return self.send(404, b"NoSuchKey", head=head)
        data = repo.files[path]
        headers = [("ETag", f'"{parts[1]}"'), ("Accept-Ranges", "bytes"), ("Content-Type", "binary/octet-stream"),
                   ("Content-Disposition", f'inline; filename="{path.rsplit("/", 1)[-1]}";')]
        fault = self.hub.faults.get((repo.id, path))
        if fault and not head:
            return self.apply_fault(fault, repo, path, data, headers)
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start, _, end = rng[6:].partition("-")
            start, end = int(start or 0), int(end) if end else len(data) - 1
            headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
            return self.send(206, data[start:end + 1], headers)
        return self.send(200, data, headers, head)

    def apply_fault(self, fault, repo, path, data, headers):
        if fault == "500":
            return self.send(500, b"Internal Server Error", head=False)
        if fault == "cut":
            self.send_response(200)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.hub.record(self.command, self.path, "cut")
            return
        raise ValueError(fault)

