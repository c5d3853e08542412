#!/usr/bin/env python3
"""Parse Dockerfiles with BuildKit's own Go parser (PyPI `dockerfile`, which
wraps moby/buildkit's frontend/dockerfile/parser) for kiln's differential
test. Usage: buildkit_parse.py LIST_FILE; LIST_FILE names one Dockerfile per
line. Prints one JSON object per input line, in order:
  {"ok": true, "nodes": [{cmd, sub_cmd, json, flags, value, start_line,
                          end_line, heredocs: [{name, fd, content}]}, ...]}
  {"ok": false, "error": "..."}
  {"ok": null, "undecodable": true}   (Go produced a non-UTF-8 string)
"""
import json
import sys

import dockerfile


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    out = sys.stdout
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        try:
            cmds = dockerfile.parse_string(text)
        except dockerfile.GoParseError as e:
            out.write(json.dumps({"ok": False, "error": str(e)}) + "\n")
            continue
        except UnicodeDecodeError:
            # Go built a string that is not UTF-8 (BuildKit splits flags and
            # HEALTHCHECK byte by byte); the binding cannot return it.
            out.write(json.dumps({"ok": None, "undecodable": True}) + "\n")
            continue
        nodes = []
        for c in cmds:
            nodes.append({
                "cmd": c.cmd,
                "sub_cmd": c.sub_cmd,
                "json": c.json,
                "flags": list(c.flags),
                "value": list(c.value),
                "start_line": c.start_line,
                "end_line": c.end_line,
                "heredocs": [
                    {"name": h.name, "fd": h.file_descriptor, "content": h.content}
                    for h in c.heredocs
                ],
            })
        out.write(json.dumps({"ok": True, "nodes": nodes}) + "\n")


if __name__ == "__main__":
    main()
