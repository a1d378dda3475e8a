"""A small job server with the REST shape of Ray's Jobs API, storing jobs in SQLite or JSON.

POST /api/jobs/ {"entrypoint": "..."} -> {"job_id"}; GET /api/jobs/<id> -> {"status", ...};
GET /api/jobs/<id>/logs -> {"logs"}; GET /api/version; GET / (an HTML page listing jobs).
The store comes from JOBS_STORE: sqlite://<path> or json://<path>.
"""

import argparse
import json
import os
import sqlite3
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOCK = threading.Lock()


class Store:
    def __init__(self, url: str) -> None:
        self.kind, _, path = url.partition("://")
        self.path = Path(path)
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as db:
                db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, body TEXT)")
        elif self.kind == "json":
            self.path.write_text("{}")
        else:
            raise SystemExit(f"JOBS_STORE: unknown store '{self.kind}'")

    def put(self, job: dict) -> None:
        with LOCK:
            if self.kind == "sqlite":
                with sqlite3.connect(self.path) as db:
                    db.execute("REPLACE INTO jobs VALUES (?, ?)", (job["job_id"], json.dumps(job)))
            else:
                jobs = json.loads(self.path.read_text())
                jobs[job["job_id"]] = job
                self.path.write_text(json.dumps(jobs))

    def all(self) -> dict:
        with LOCK:
            if self.kind == "sqlite":
                with sqlite3.connect(self.path) as db:
                    return {k: json.loads(v) for k, v in db.execute("SELECT id, body FROM jobs")}
            return json.loads(self.path.read_text())


def run_job(store: Store, job: dict) -> None:
    job["status"] = "RUNNING"
    store.put(job)
    done = subprocess.run(job["entrypoint"], shell=True, capture_output=True, text=True)
    job["logs"] = done.stdout + done.stderr
    job["status"] = "SUCCEEDED" if done.returncode == 0 else "FAILED"
    store.put(job)


def make_handler(store: Store) -> type[BaseHTTPRequestHandler]:
    store_name = "jsonfile" if store.kind == "json" else store.kind

    class Handler(BaseHTTPRequestHandler):
        def reply(self, status: int, body: object, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            parts = [p for p in self.path.split("/") if p]
            jobs = store.all()
            if parts == ["api", "version"]:
                return self.reply(200, {"version": "1", "store": store_name})
            if parts == []:
                rows = "".join(f"<li>{j} {v['status']}</li>" for j, v in jobs.items())
                return self.reply(200, f"<html><h1>Jobs</h1><ul>{rows}</ul></html>", "text/html")
            if len(parts) >= 3 and parts[:2] == ["api", "jobs"] and parts[2] in jobs:
                job = jobs[parts[2]]
                if parts[3:] == ["logs"]:
                    return self.reply(200, {"logs": job.get("logs", "")})
                return self.reply(200, {k: v for k, v in job.items() if k != "logs"})
            return self.reply(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/api/jobs":
                return self.reply(404, {"error": f"no route {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            job = {"job_id": uuid.uuid4().hex[:12], "entrypoint": body["entrypoint"],
                   "status": "PENDING", "store": store_name}
            store.put(job)
            threading.Thread(target=run_job, args=(store, job), daemon=True).start()
            return self.reply(200, {"job_id": job["job_id"]})

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            print(format % args, flush=True)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    store = Store(os.environ["JOBS_STORE"])
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(store))
    print(f"jobserver on {args.port}, store {store.kind}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
