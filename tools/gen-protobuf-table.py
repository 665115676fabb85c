#!/usr/bin/env python3
"""Generates apiserver-lite/src/protobuf/messages.txt: the Kubernetes protobuf message table.

Field numbers and wire types come from the prost definitions of the `k8s-pb` crate; JSON field
names come from `k8s-openapi` (its deserializers map JSON names to Rust field names), the crate
the server's types come from. `k8s-pb` is not a dependency: put it into cargo's registry once
(a scratch crate with `k8s-pb = "0.9"` and `cargo fetch`), then:

    python3 tools/gen-protobuf-table.py

`cargo test -p apiserver-lite --lib protobuf` then decodes every built-in kind with every field
set and checks that k8s-openapi's type keeps all of it.

Output lines:  M <message>            a message, e.g. api.core.v1.ConfigMap
               F <tag> <json> <kind> <label> [<type>]
kind: string|int32|int64|bool|bytes|double|message|map; label: opt|rep;
type: the message path (message), or `string,string` / `string,bytes` / `string,<message>` (map).
json `-`: an embedded (inline) Go struct, such as `LocalObjectReference` in
`ConfigMapKeySelector` or `VolumeSource` in `Volume`: protobuf carries it as a field of its own,
JSON has its fields in the parent's object. A message field is embedded when k8s-openapi's struct
has no field of its name and has the fields of the embedded message.
"""
import glob
import os
import re
import sys

registry = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))
def find(pattern):
    hits = sorted(h for r in registry for h in glob.glob(os.path.join(r, pattern)))
    if not hits:
        sys.exit(f"not found: {pattern} (run cargo fetch first)")
    return hits[-1]

pb = find("k8s-pb-0.9.*")
oa = os.path.join(find("k8s-openapi-0.29.*"), "src", "v1_33")

# JSON names from k8s-openapi: (module path, struct) -> {snake: json}
json_names = {}
for path in glob.glob(os.path.join(oa, "**", "*.rs"), recursive=True):
    rel = os.path.relpath(os.path.dirname(path), oa).replace(os.sep, ".")
    text = open(path).read()
    for block in re.split(r"\nimpl<'de> crate::serde::Deserialize<'de> for ", text)[1:]:
        name = block.split(" ", 1)[0].split("{", 1)[0].strip()
        mapping = dict((s, j) for j, s in re.findall(r'"([^"]+)" => Field::Key_(\w+),', block))
        json_names[(rel, name.lower())] = mapping

def camel(snake):
    parts = snake.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])

def resolve(module, rust_type):
    """Message path of a Rust type path used in `module`."""
    t = rust_type
    for wrapper in ("::core::option::Option<", "::prost::alloc::vec::Vec<", "::prost::alloc::boxed::Box<"):
        while t.startswith(wrapper):
            # rustfmt leaves a comma after a wrapped generic argument: `Option<a::B,>`.
            t = t[len(wrapper):-1].rstrip(", ")
    parts = t.split("::")
    base = module.split(".")
    while parts and parts[0] == "super":
        parts.pop(0)
        base = base[:-1]
    return ".".join(base + parts)

out = []
names_of = {}  # message path -> k8s-openapi's {snake: json} of the same struct
snakes_of = {}  # message path -> the snake names of its fields, in table order
for path in sorted(glob.glob(os.path.join(pb, "src", "**", "mod.rs"), recursive=True)):
    module = os.path.relpath(os.path.dirname(path), os.path.join(pb, "src")).replace(os.sep, ".")
    lines = open(path).read().split("\n")
    i = 0
    current = None
    while i < len(lines):
        line = lines[i]
        m = re.match(r"pub struct (\w+) \{", line)
        if m:
            current = m.group(1)
            out.append(f"M {module}.{current}")
            names_of[f"{module}.{current}"] = json_names.get((module, current.lower()), {})
            snakes_of[f"{module}.{current}"] = []
            i += 1
            continue
        if line == "}":
            current = None
        a = re.match(r"\s+#\[prost\((.*)\)\]$", line)
        if a and current:
            attr = a.group(1)
            j = i + 1
            decl = lines[j].strip()
            while not (decl.endswith(",") and decl.count("<") == decl.count(">")):
                j += 1
                decl = decl + lines[j].strip()
            fm = re.match(r"pub (r#)?(\w+):\s*(.*),$", decl)
            if not fm:
                sys.exit(f"cannot parse field after {attr!r}: {decl!r}")
            snake, rust_type = fm.group(2), fm.group(3)
            tag = re.search(r'tag = "(\d+)"', attr).group(1)
            label = "rep" if "repeated" in attr else "opt"
            names = json_names.get((module, current.lower()), {})
            # prost and k8s-openapi split acronyms differently (pod_cid_rs / pod_cidrs).
            if snake not in names:
                squashed = {k.replace("_", ""): k for k in names}
                snake = squashed.get(snake.replace("_", ""), snake)
            json = names.get(snake) or camel(snake)
            snakes_of[f"{module}.{current}"].append(snake)
            if attr.startswith("btree_map") or attr.startswith("map"):
                key, value = [x.strip() for x in re.search(r'map = "([^"]+)"', attr).group(1).split(",")]
                if value == "message":
                    inner = rust_type[rust_type.index(",") + 1:].rsplit(">", 1)[0].strip().rstrip(",").strip()
                    value = resolve(module, inner)
                out.append(f"F {tag} {json} map opt {key},{value}")
            elif attr.startswith("message"):
                known = json_names.get((module, current.lower()), {})
                # `?` marks a candidate for embedding, decided once every message is read.
                mark = "?" if known and snake not in known and label == "opt" else ""
                out.append(f"F {tag} {mark}{json} message {label} {resolve(module, rust_type)}")
            else:
                kind = attr.split(",")[0].split(" ")[0].strip()
                out.append(f"F {tag} {json} {kind} {label}")
            i = j + 1
            continue
        i += 1

# Embedded structs: a candidate whose message's fields are fields of the parent's k8s-openapi
# struct (which has them inline). The embedded message's JSON names are the parent's
# (k8s-openapi has no struct of its own for some, such as VolumeSource: camel() guessed them).
starts = {}
message = None
for n, line in enumerate(out):
    if line.startswith("M "):
        message = line[2:]
        starts[message] = n
renames = {}  # (message, field index) -> JSON name
types_of = {}  # message path -> the message type of each field (None for others)
message = None
for line in out:
    if line.startswith("M "):
        message = line[2:]
        types_of[message] = []
    else:
        parts = line.split(" ")
        types_of[message].append(parts[5] if parts[3] == "message" else None)

def covered(message, k, parent, depth=0):
    """Whether field k of `message` is a field of `parent` once embedded, itself or (an
    embedded struct in an embedded struct, such as Rule in RuleWithOperations) through its own
    fields."""
    sn = snakes_of[message][k]
    if sn.replace("_", "") in {p.replace("_", "") for p in parent}:
        return True
    inner = types_of[message][k]
    if inner is None or depth > 2 or not snakes_of.get(inner):
        return False
    return all(covered(inner, j, parent, depth + 1) for j in range(len(snakes_of[inner])))

message = None
for n, line in enumerate(out):
    if line.startswith("M "):
        message = line[2:]
        continue
    parts = line.split(" ")
    if not parts[2].startswith("?"):
        continue
    parent = names_of.get(message, {})
    inner = snakes_of.get(parts[5], [])
    # k8s-pb may be a release ahead of k8s-openapi's newest API (EphemeralContainerCommon has
    # restartPolicyRules there): a few fields the parent does not know yet do not count.
    missing = sum(1 for k, sn in enumerate(inner) if not covered(parts[5], k, parent))
    if inner and missing < len(inner) and missing <= len(inner) // 4:
        parts[2] = "-"
        for k, sn in enumerate(inner):
            if sn in parent:
                renames[(parts[5], k)] = parent[sn]
            elif types_of[parts[5]][k] and covered(parts[5], k, parent):
                renames[(parts[5], k)] = "-"
    else:
        parts[2] = parts[2][1:]
    out[n] = " ".join(parts)
for (message, k), json in renames.items():
    n = starts[message] + 1 + k
    parts = out[n].split(" ")
    parts[2] = "-" if parts[2] == "-" else json
    out[n] = " ".join(parts)

# Fields k8s-pb has and the served API (k8s-openapi's release) does not: a client a release ahead
# may send them, and upstream at the served release skips them as unknown protobuf fields. They
# leave the table, so the decoder skips them too. A message k8s-openapi has no struct for (an
# embedded one) is judged by its parent's fields.
parent_of = {}
message = None
for line in out:
    if line.startswith("M "):
        message = line[2:]
    elif line.split(" ")[2] == "-":
        parent_of[line.split(" ")[5]] = message
kept = []
message = None
index = 0
dropped = 0
for line in out:
    if line.startswith("M "):
        message = line[2:]
        index = 0
        kept.append(line)
        continue
    snake = snakes_of[message][index]
    index += 1
    known = names_of.get(message)
    chain = message
    while not known and chain in parent_of:
        chain = parent_of[chain]
        known = names_of.get(chain)
    embedded = line.split(" ")[2] == "-"
    if known and not embedded and snake.replace("_", "") not in {k.replace("_", "") for k in known}:
        dropped += 1
        continue
    kept.append(line)
out = kept

target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apiserver-lite", "src", "protobuf", "messages.txt")
with open(target, "w") as f:
    f.write("# Generated by tools/gen-protobuf-table.py from k8s-pb 0.9 and k8s-openapi 0.29 (v1_33). Do not edit.\n")
    f.write("\n".join(out) + "\n")
print(f"wrote {target}: {sum(1 for l in out if l.startswith('M '))} messages, {sum(1 for l in out if l.startswith('F '))} fields ({dropped} newer than the served API left out)")
