"""Notes and files: a small file tree of text notes with tags."""

from __future__ import annotations

from typing import Any

from k2.agentic.domain import Domain, assertion, register_domain
from k2.agentic.tools import ToolError, tool

MAX_FILE_CHARS = 100_000


def _check_path(path: str) -> str:
    if not path.startswith("/") or path.endswith("/") or "//" in path or "/../" in path + "/":
        raise ToolError(f"invalid path {path!r}: use an absolute path like /notes/todo.txt", "invalid_path")
    return path


@register_domain
class NotesDomain(Domain):
    name = "notes"
    policy = (
        "You manage the user's notes, a tree of text files. Read a file before changing it. "
        "Never overwrite or delete a file unless the user asked for exactly that. Paths are "
        "absolute (/folder/name.txt)."
    )

    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        return {
            "clock": 100,
            "files": {
                "/notes/todo.txt": {"content": "buy milk\ncall the dentist\n", "tags": ["personal"], "modified": 90},
                "/notes/ideas.md": {"content": "# Ideas\n- a bike rack for the office\n", "tags": [], "modified": 80},
                "/work/meeting-2024-05-02.md": {
                    "content": "Attendees: Ana, Raj\nDecision: ship v2 on June 3\n",
                    "tags": ["work", "meetings"],
                    "modified": 70,
                },
                "/work/budget.csv": {"content": "item,cost\nlaptops,4200\nsoftware,900\n", "tags": ["work"], "modified": 60},
            },
        }

    def _file(self, path: str) -> dict[str, Any]:
        _check_path(path)
        found = self.state["files"].get(path)
        if found is None:
            raise ToolError(f"no file at {path}", "not_found")
        return found

    def _touch(self, entry: dict[str, Any]) -> None:
        self.state["clock"] += 1
        entry["modified"] = self.state["clock"]

    @tool(kind="read")
    def list_files(self, folder: str = "/") -> list[dict[str, Any]]:
        """List the files under a folder.

        Args:
            folder: absolute folder path, e.g. /notes (default: every file).
        """
        prefix = folder.rstrip("/") + "/"
        return [
            {"path": p, "tags": f["tags"], "size": len(f["content"])}
            for p, f in sorted(self.state["files"].items())
            if p.startswith(prefix)
        ]

    @tool(kind="read")
    def read_file(self, path: str) -> dict[str, Any]:
        """Read a file's content and tags.

        Args:
            path: absolute path of the file.
        """
        entry = self._file(path)
        return {"path": path, "content": entry["content"], "tags": entry["tags"]}

    @tool(kind="read")
    def search_files(self, query: str) -> list[str]:
        """Find files whose content or path contains a text (case-insensitive).

        Args:
            query: the text to look for.
        """
        if not query.strip():
            raise ToolError("query must not be empty", "invalid_argument")
        q = query.lower()
        return [p for p, f in sorted(self.state["files"].items()) if q in p.lower() or q in f["content"].lower()]

    @tool(kind="write")
    def write_file(self, path: str, content: str, overwrite: bool = False) -> dict[str, Any]:
        """Create a file, or replace one when overwrite is true.

        Args:
            path: absolute path of the file.
            content: the full new content.
            overwrite: replace an existing file (otherwise that is an error).
        """
        _check_path(path)
        if len(content) > MAX_FILE_CHARS:
            raise ToolError(f"content is {len(content)} characters; the limit is {MAX_FILE_CHARS}", "too_large")
        files = self.state["files"]
        if path in files and not overwrite:
            raise ToolError(f"{path} already exists; pass overwrite=true to replace it", "already_exists")
        entry = files.setdefault(path, {"content": "", "tags": [], "modified": 0})
        entry["content"] = content
        self._touch(entry)
        return {"path": path, "size": len(content)}

    @tool(kind="write")
    def append_to_file(self, path: str, text: str) -> dict[str, Any]:
        """Append text to the end of an existing file (a newline is added if missing).

        Args:
            path: absolute path of the file.
            text: the text to append.
        """
        entry = self._file(path)
        new = entry["content"]
        if new and not new.endswith("\n"):
            new += "\n"
        new += text if text.endswith("\n") else text + "\n"
        if len(new) > MAX_FILE_CHARS:
            raise ToolError(f"{path} would exceed {MAX_FILE_CHARS} characters", "too_large")
        entry["content"] = new
        self._touch(entry)
        return {"path": path, "size": len(entry["content"])}

    @tool(kind="write")
    def move_file(self, source: str, destination: str) -> dict[str, Any]:
        """Move or rename a file.

        Args:
            source: the file's current absolute path.
            destination: its new absolute path (must not exist).
        """
        entry = self._file(source)
        _check_path(destination)
        if destination in self.state["files"]:
            raise ToolError(f"{destination} already exists", "already_exists")
        del self.state["files"][source]
        self.state["files"][destination] = entry
        self._touch(entry)
        return {"path": destination}

    @tool(kind="write")
    def delete_file(self, path: str) -> dict[str, Any]:
        """Delete a file.

        Args:
            path: absolute path of the file.
        """
        self._file(path)
        del self.state["files"][path]
        return {"deleted": path}

    @tool(kind="write")
    def tag_file(self, path: str, tag: str) -> dict[str, Any]:
        """Add a tag to a file (no effect if it already has it).

        Args:
            path: absolute path of the file.
            tag: a lowercase word.
        """
        entry = self._file(path)
        if not tag.isidentifier() or tag != tag.lower():
            raise ToolError(f"tag {tag!r} must be one lowercase word", "invalid_argument")
        if tag not in entry["tags"]:
            entry["tags"].append(tag)
            entry["tags"].sort()
        return {"path": path, "tags": entry["tags"]}

    @assertion
    def file_contains(self, path: str, text: str) -> bool:
        """Whether the file at ``path`` exists and contains ``text``."""
        entry = self.state["files"].get(path)
        return entry is not None and text in entry["content"]
