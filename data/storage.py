"""Storage anywhere fsspec reaches: local folders, s3://, gs://, memory://.

A ``Storage`` is a root URI plus its fsspec options. It is a small picklable
value so it travels to Ray actors; the filesystem object is made lazily on
each process.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec


@dataclass(frozen=True)
class Storage:
    root: str
    """Root URI (a local path or scheme://bucket/prefix)."""
    options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the root's filesystem (e.g. endpoint_url for S3-compatible servers)."""
    roots: Any = field(default=None, compare=False)
    """specs.paths.PathRoots a job on this storage may read and write (cluster.yaml paths); None = any."""

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root, **self.options)[0]

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def path(self, *parts: str) -> str:
        """Join parts under a URI or path (no normalisation of the root)."""
        return posixpath.join(self.root.rstrip("/"), *parts) if parts else self.root

    def local_path(self, uri: str) -> str:
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def exists(self, uri: str) -> bool:
        return self.fs.exists(uri)

    def read_text(self, uri: str) -> str:
        with self.fs.open(uri, "r") as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))

    def write_text(self, uri: str, text: str) -> None:
        """Write a whole file so a reader sees the old content or the new, never half.

        Local: write a temp file then rename. Object stores: a PUT is atomic already.
        """
        fs = self.fs
        if self.is_local:
            path = self.local_path(uri)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with fs.open(uri, "w") as f:
                f.write(text)

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True))

    def makedirs(self, uri: str) -> None:
        self.fs.makedirs(uri, exist_ok=True)

    def put_dir(self, local_dir: str, uri: str) -> list[str]:
        """Upload every file under local_dir to uri (keeping relative paths); return the relative paths."""
        fs = self.fs
        rel_paths = []
        for dirpath, _, files in os.walk(local_dir):
            for name in files:
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                dst = posixpath.join(uri, rel)
                if self.is_local:
                    os.makedirs(os.path.dirname(self.local_path(dst)), exist_ok=True)
                fs.put_file(src, dst)
                rel_paths.append(rel)
        return sorted(rel_paths)

    def get_dir(self, uri: str, local_dir: str) -> None:
        """Download every file under uri into local_dir."""
        fs = self.fs
        base = fs._strip_protocol(uri).rstrip("/")
        for path in fs.find(uri):
            rel = path[len(base):].lstrip("/")
            dst = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(path, dst)


def storage_for(path: str, storage: Storage) -> Storage:
    """A Storage rooted at ``path``, with the run storage's options when it is on the same filesystem."""
    scheme = path.split("://")[0] if "://" in path else "file"
    same = scheme == (storage.root.split("://")[0] if "://" in storage.root else "file")
    return Storage(path, dict(storage.options) if same else {})
