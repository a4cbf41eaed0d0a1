"""Notes task templates (docs/synthesis.md)."""

from __future__ import annotations

from k2.agentic.synth.plan import Call, Ctx, Draft, Secret, ask, calls, confirm, say
from k2.agentic.synth.templates import template

FACTS = {"your name|who": "I'm Alex."}
LINES = ("water the plants", "book flights", "renew passport", "pay rent", "call mum", "fix the bike", "order printer ink")
WORDS = ("ideas", "recipes", "travel", "reading", "garden", "shopping", "goals")
TAGS = ("urgent", "later", "home", "review", "archive", "draft")


@template("notes", "single", info=True)
def read_note(ctx: Ctx) -> Draft:
    path = ctx.rng.choice(sorted(ctx.state["files"]))
    call = Call("f", "read_file", {"path": path})
    got = ctx.run(call)
    first = got["content"].splitlines()[0]
    return Draft(
        opening=f"What's the first line of my file {path}?",
        vague="What's the first line of one of my notes?",
        secrets=[Secret("file path", f"The file {path}.", (path,))],
        steps=[calls(call), say(lambda r: f"The first line of {path} is: {r['f']['content'].splitlines()[0]}")],
        communicate=[first], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "single")
def list_folder(ctx: Ctx) -> Draft:
    folder = ctx.rng.choice(("/notes", "/work"))
    call = Call("l", "list_files", {"folder": folder})
    got = ctx.run(call)
    return Draft(
        opening=f"Which files are in my {folder} folder?",
        steps=[calls(call), say(lambda r: f"{folder} holds: " + ", ".join(f["path"] for f in r["l"]) + ".")],
        communicate=[f["path"] for f in got], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "multi", info=True)
def append_line(ctx: Ctx) -> Draft:
    path = ctx.rng.choice(("/notes/todo.txt", "/notes/ideas.md"))
    line = ctx.rng.choice(LINES)
    read = Call("f", "read_file", {"path": path})
    add = Call("a", "append_to_file", {"path": path, "text": line})
    ctx.run(read)
    ctx.run(add)
    return Draft(
        opening=f"Please add the line '{line}' to {path}.",
        vague=f"Please add '{line}' to one of my notes.",
        secrets=[Secret("file path", f"Add it to {path}.", (path,))],
        steps=[calls(read), calls(add), say(f"Added '{line}' at the end of {path}.")],
        communicate=[line], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "single")
def new_note(ctx: Ctx) -> Draft:
    word = ctx.rng.choice(WORDS)
    path = f"/notes/{word}-{ctx.rng.randrange(1, 99)}.txt"
    content = f"{ctx.rng.choice(LINES)}\n{ctx.rng.choice(LINES)}\n"
    call = Call("w", "write_file", {"path": path, "content": content})
    ctx.run(call)
    return Draft(
        opening=f"Create a note at {path} with two lines: {content.splitlines()[0]}, then {content.splitlines()[1]}.",
        steps=[calls(call), say(f"Created {path} with your two lines.")],
        communicate=[path], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "multi")
def rename(ctx: Ctx) -> Draft:
    src = ctx.rng.choice(sorted(ctx.state["files"]))
    dst = f"/archive/{ctx.rng.choice(WORDS)}-{src.rsplit('/', 1)[1]}"
    read = Call("l", "list_files", {"folder": "/archive"})
    move = Call("m", "move_file", {"source": src, "destination": dst})
    ctx.run(read)
    ctx.run(move)
    return Draft(
        opening=f"Move {src} to {dst}, please.",
        steps=[calls(read), confirm(f"I'll move {src} to {dst}. Shall I go ahead?"), calls(move), say(f"Moved: the file is now at {dst}.")],
        communicate=[dst], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "parallel")
def tag_two(ctx: Ctx) -> Draft:
    a, b = sorted(ctx.rng.sample(sorted(ctx.state["files"]), 2))
    tag = ctx.rng.choice(TAGS)
    writes = [Call("a", "tag_file", {"path": a, "tag": tag}), Call("b", "tag_file", {"path": b, "tag": tag})]
    for c in writes:
        ctx.run(c)
    return Draft(
        opening=f"Tag both {a} and {b} with '{tag}'.",
        steps=[calls(*writes), say(f"Both {a} and {b} are now tagged '{tag}'.")],
        communicate=[tag], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "error")
def overwrite(ctx: Ctx) -> Draft:
    path = ctx.rng.choice(("/notes/todo.txt", "/notes/ideas.md"))
    content = f"{ctx.rng.choice(LINES)}\n"
    first = Call("fail", "write_file", {"path": path, "content": content}, "already_exists")
    second = Call("w", "write_file", {"path": path, "content": content, "overwrite": True})
    ctx.run(first)
    ctx.run(second)
    return Draft(
        opening=f"Write '{content.strip()}' into {path}.",
        facts={**FACTS, "overwrite|replace": "Yes, overwrite it, please."},
        steps=[calls(first), ask(f"{path} already exists. Should I overwrite it with the new text?", "yes"), calls(second),
               say(f"{path} now contains just '{content.strip()}'.")],
        communicate=[content.strip()], known_info="You are Alex. Replacing the old file is fine.",
    )


@template("notes", "impossible")
def missing_file(ctx: Ctx) -> Draft:
    path = f"/notes/{ctx.rng.choice(WORDS)}-old.txt"
    call = Call("f", "read_file", {"path": path}, "not_found")
    ctx.run(call)
    return Draft(
        opening=f"Please delete my note {path}.",
        steps=[calls(call), say(f"There is no file at {path}, so there is nothing to delete. Nothing was changed.")],
        communicate=["no file"], known_info="You are Alex.", facts=FACTS,
    )



@template("notes", "parallel")
def read_two(ctx: Ctx) -> Draft:
    a, b = sorted(ctx.rng.sample(sorted(ctx.state["files"]), 2))
    reads = [Call("a", "read_file", {"path": a}), Call("b", "read_file", {"path": b})]
    got = [ctx.run(c) for c in reads]
    return Draft(
        opening=f"What are the first lines of {a} and {b}?",
        steps=[calls(*reads), say(lambda r: f"{a} starts with: {r['a']['content'].splitlines()[0]}. {b} starts with: {r['b']['content'].splitlines()[0]}.")],
        communicate=[g["content"].splitlines()[0] for g in got], known_info="You are Alex.", facts=FACTS,
    )


@template("notes", "error")
def wrong_path(ctx: Ctx) -> Draft:
    real = ctx.rng.choice(("/notes/todo.txt", "/notes/ideas.md"))
    stem = real.rsplit("/", 1)[1].split(".")[0]
    guess = f"/notes/{stem}.{'md' if real.endswith('.txt') else 'txt'}"
    line = ctx.rng.choice(LINES)
    first = Call("fail", "append_to_file", {"path": guess, "text": line}, "not_found")
    find = Call("s", "search_files", {"query": stem})
    add = Call("a", "append_to_file", {"path": real, "text": line})
    for c in (first, find, add):
        ctx.run(c)
    return Draft(
        opening=f"Add '{line}' to {guess}.",
        steps=[calls(first), calls(find), confirm(f"There is no {guess}, but there is {real}. Shall I add the line there?"),
               calls(add), say(f"Added '{line}' to {real}.")],
        communicate=[real], known_info=f"You are Alex. You meant {real}.", facts=FACTS,
    )
