#!/usr/bin/env python3
"""The import graph of agent/src (ARCHITECTURE.md, "Layers"): one node per file, an
edge A -> B when A names a path into B (use statements and inline crate::, super::,
self:: paths; a test module's `super` is its own file). A folder's mod.rs naming its
own parts is not counted (--strict counts it). Prints the circles (strongly
connected components of more than one file); --check-layers also prints every edge
that goes up the layers and exits 1 if there is any circle or upward edge; --rooms
the circles between top-level rooms.

Usage: python3 integration/import-graph.py [agent/src] [--strict] [--check-layers] [--rooms]"""
import os, re, sys
args = [a for a in sys.argv[1:] if not a.startswith('--')]
root = args[0] if args else 'agent/src'
include_parent_child = '--strict' in sys.argv
files = {}
for dp, dn, fn in os.walk(root):
    for f in fn:
        if f.endswith('.rs'):
            p = os.path.join(dp, f)
            rel = os.path.relpath(p, root)
            if rel.startswith('bin/'):
                continue
            parts = rel[:-3].split('/')
            if parts[-1] in ('mod', 'lib'):
                parts = parts[:-1]
            files[tuple(parts)] = rel
# modules declared inline with #[path] or `mod x;` inside a file named x.rs -> x/child.rs handled by path
def resolve(mod, path):
    """Longest prefix of path that is a file module."""
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in files:
            return tuple(path[:n])
    return None
def strip_comments(src):
    src = re.sub(r'//[^\n]*', '', src)
    src = re.sub(r'/\*.*?\*/', '', src, flags=re.S)
    return src
def expand_use(tree):
    """a::{b, c::{d, e}} -> [a::b, a::c::d, a::c::e] (roughly)."""
    tree = re.sub(r'\s+', '', tree)
    out = []
    def rec(prefix, t):
        if t.startswith('{') and t.endswith('}'):
            depth, cur, items = 0, '', []
            for ch in t[1:-1]:
                if ch == ',' and depth == 0:
                    items.append(cur); cur = ''
                else:
                    depth += ch == '{'; depth -= ch == '}'; cur += ch
            items.append(cur)
            for it in items:
                if it: rec(prefix, it)
            return
        m = re.match(r'([A-Za-z0-9_]+)::(.*)$', t)
        if m:
            rec(prefix + [m.group(1)], m.group(2))
        else:
            name = re.sub(r'as[A-Za-z0-9_]+$', '', t)
            out.append(prefix + ([name] if name not in ('self', '*') else []))
    rec([], tree)
    return out
edges = {}
for mod, rel in files.items():
    src = strip_comments(open(os.path.join(root, rel)).read())
    # Inside an inline module (`mod tests { use super::*; }`) `super` is this file.
    out, k = '', 0
    for m in re.finditer(r'\bmod\s+\w+\s*\{', src):
        if m.start() < k:
            continue
        depth, j = 0, m.end() - 1
        while j < len(src):
            depth += src[j] == '{'; depth -= src[j] == '}'
            if depth == 0:
                break
            j += 1
        out += src[k:m.start()] + src[m.start():j].replace('super::', 'self::')
        k = j
    src = out + src[k:]
    # a file's tests module (#[cfg(test)] mod tests { use super::*; }) is the file itself
    paths = []
    for m in re.finditer(r'\buse\s+([^;]+);', src):
        paths += expand_use(m.group(1))
    for m in re.finditer(r'\b((?:crate|super|self)(?:::[A-Za-z0-9_]+)+)', src):
        paths.append(m.group(1).split('::'))
    for p in paths:
        if not p: continue
        # inside `mod tests { use super::* }` super means the file itself; approximate:
        if p[0] == 'crate':
            abs_ = p[1:]
        elif p[0] in ('super', 'self'):
            base = list(mod)
            is_dir_mod = rel.endswith('mod.rs') or rel == 'lib.rs'
            q = p
            # `self::` and `super::` are relative to the module of this file
            cur = base
            while q and q[0] in ('super', 'self'):
                if q[0] == 'super':
                    cur = cur[:-1]
                q = q[1:]
            abs_ = cur + q
        else:
            # a child module of this one (use child::X in a mod.rs), else an external crate
            cand = list(mod) + p
            if resolve(mod, cand) and tuple(cand[:len(mod)+1]) in files:
                abs_ = cand
            else:
                continue
        tgt = resolve(mod, abs_)
        # The crate root: only #[macro_export] macros (emit!) are named through it.
        if tgt is None or tgt == mod or tgt == ():
            continue
        # A folder's door naming its own parts; only --strict counts it.
        if not include_parent_child and mod == tgt[:len(mod)]:
            continue
        edges.setdefault(mod, set()).add(tgt)
# Tarjan
index, low, stack, on, sccs = {}, {}, [], set(), []
sys.setrecursionlimit(10000)
i = [0]
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            sc(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1:
            sccs.append(comp)
for v in list(files):
    if v not in index:
        sc(v)
for c in sccs:
    print('cycle:', sorted(files[m] for m in c))
    for a in c:
        for b in edges.get(a, ()):
            if b in c:
                print('   ', files[a], '->', files[b])
print(len(files), 'files,', sum(len(v) for v in edges.values()), 'edges,', len(sccs), 'cycles')
failed = False
if '--check-layers' in sys.argv:
    # With --check-layers the exit status is the verdict: a circle or an upward edge fails.
    failed = bool(sccs)
    layers = [
        ['timefmt', 'version', 'durable', 'events', 'logging', 'cause', 'reboot_method', 'health', 'fleetlock', 'halt', 'midstate', 'verity', 'blockio', 'hashio', 'pstore', 'payload/limits', 'payload/error'],
        ['payload', 'channel', 'policy/mod', 'policy/wave', 'policy/window', 'policy', 'trust', 'trust/envelope', 'trust/root', 'trust/root_tests'],
        ['apply', 'file_target', 'partial'],
        ['config'],
        ['fetch', 'slots'],
        ['boot', 'state', 'history', 'trust/node', 'trust/marks', 'trust/node_tests'],
        ['policy/decide', 'update', 'postboot', 'kexec', 'metrics'],
        ['daemon'],
        ['api'],
        ['cli'],
        ['lib'],
    ]
    where = {}
    for i, names in enumerate(layers):
        for n in names: where[n] = i
    def layer(m):
        if not m: return where['lib']
        for n in range(len(m), 0, -1):
            k = '/'.join(m[:n])
            if k in where: return where[k]
        # A new room must be given its layer here and in ARCHITECTURE.md.
        sys.exit(f'no layer for {"/".join(m)}: add it to the table in {sys.argv[0]} and to ARCHITECTURE.md')
    bad = 0
    for a, bs in edges.items():
        for b in bs:
            if layer(b) > layer(a):
                print('upward:', files[a], '->', files[b]); bad += 1
    print(bad, 'upward edges')
    failed = failed or bad > 0
if '--rooms' in sys.argv:
    # A room: a top-level file, or a top-level folder module with everything in it.
    room = lambda m: m[0] if m else 'lib'
    redges = {}
    for a, bs in edges.items():
        for b in bs:
            if room(a) != room(b):
                redges.setdefault(room(a), set()).add((room(b), files[a], files[b]))
    # cycles between rooms (pairs and longer) via Tarjan on rooms
    g = {r: {t for t, _, _ in v} for r, v in redges.items()}
    idx, lo, st, on2, out = {}, {}, [], set(), []
    c = [0]
    def sc2(v):
        idx[v] = lo[v] = c[0]; c[0] += 1; st.append(v); on2.add(v)
        for w in g.get(v, ()):
            if w not in idx:
                sc2(w); lo[v] = min(lo[v], lo[w])
            elif w in on2:
                lo[v] = min(lo[v], idx[w])
        if lo[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on2.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(comp)
    for r in list(g):
        if r not in idx: sc2(r)
    for comp in out:
        print('room cycle:', sorted(comp))
        for a in comp:
            for t, fa, fb in sorted(redges.get(a, ())):
                if t in comp: print('   ', fa, '->', fb)
    print(len(out), 'room cycles')
sys.exit(1 if failed else 0)
