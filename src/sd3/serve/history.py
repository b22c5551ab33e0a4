"""The server's job history: an SQLite file in the outputs folder that survives restarts.

Two tables: `jobs` (one row per request, whatever became of it: done, failed or cancelled, with
its settings, error and timings) and `images` (one row per finished image file, with the
settings that re-make it alone, its seed and the file's name in the outputs folder). The images
table backs `GET /v1/history` (newest first, paged, searched by prompt) and is the list of files
`GET /v1/images/{name}` may serve. Every write is one transaction; WAL mode lets the pages read
while the worker writes.
"""

import json
import sqlite3
import threading
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    settings TEXT NOT NULL,
    error TEXT,
    timings TEXT NOT NULL,
    images TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    settings TEXT NOT NULL,
    model TEXT NOT NULL,
    timings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_job ON images (job_id);
"""
FILE_NAME = "history.sqlite3"


class History:
    def __init__(self, folder: Path):
        self.path = Path(folder) / FILE_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record(self, job: dict, images: list[dict]) -> None:
        """A job that ended (`job`: its public view) and the image files it wrote, at once."""
        statements = [
            (
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job["id"],
                    job["state"],
                    job["source"],
                    job["created"],
                    job["started"],
                    job["finished"],
                    json.dumps(job["settings"]),
                    job["error"],
                    json.dumps(job["timings"]),
                    json.dumps([i["name"] for i in images]),
                ),
            )  # fmt: skip
        ]
        for image in images:
            s = image["settings"]
            statements.append(
                (
                    "INSERT INTO images (name, job_id, created, prompt, negative_prompt, seed, "
                    "width, height, settings, model, timings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        image["name"],
                        job["id"],
                        job["finished"],
                        s["prompt"],
                        s["negative_prompt"],
                        s["seed"],
                        s["width"],
                        s["height"],
                        json.dumps(s),
                        image["model"],
                        json.dumps(job["timings"]),
                    ),
                )  # fmt: skip
            )
        self._write(statements)

    def job(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        for key in ("settings", "timings", "images"):
            job[key] = json.loads(job[key])
        return job

    def has_image(self, name: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM images WHERE name = ?", (name,)).fetchone()
                is not None
            )

    def images(self, limit: int, offset: int = 0, query: str = "") -> tuple[int, list[dict]]:
        """(how many match, the page of them newest first); `query` is a substring of the prompt
        or the negative prompt, case-insensitive for ASCII."""
        where, args = "", ()
        if query:
            pattern = (
                "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            where = "WHERE prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\'"
            args = (pattern, pattern)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM images {where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM images {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        items = []
        for row in rows:
            item = dict(row)
            item["settings"] = json.loads(item["settings"])
            item["timings"] = json.loads(item["timings"])
            del item["id"]
            items.append(item)
        return total, items

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            images = self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return {**{state: n for state, n in rows}, "images": images}
