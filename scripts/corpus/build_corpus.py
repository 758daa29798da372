#!/usr/bin/env python3
"""Build the English pretraining corpus for the second RedKnot test model from Debian packages.

Pure stdlib (plus `apt-get download` and `dpkg-deb -x`).  Deterministic for a given set of package
versions: packages are processed in a fixed order, files in sorted order, paragraphs deduplicated by a
hash of their normalised text (first occurrence wins), documents shuffled with a fixed seed.

  python3 scripts/corpus/build_corpus.py --out .devcarry/corpus            # download + extract
  python3 scripts/corpus/build_corpus.py --debs /tmp/debs --out ...        # reuse downloaded .debs

Output: OUT/corpus.jsonl.gz, one document per line: {"src": package, "name": file, "text": ...}
(paragraphs separated by a blank line), and OUT/corpus_stats.json (documents, paragraphs, characters per
package, and the package versions).  Extractors, by format:
  dictd .dict.dz (dict-gcide, dict-foldoc, dict-jargon, dict-devil): one document per ~40 entries,
      GCIDE pronunciation marks (\\Ab*do"men\\) and {cross refs} and <tags> removed
  WordNet data.* (wordnet-base): glosses as "lemma, lemma: gloss." sentences, 60 synsets per document
  reStructuredText (linux-doc Documentation/*.rst.gz, python3.11-doc _sources/*.rst.txt), AsciiDoc
      (git-doc *.txt): directives, section underlines, tables and code blocks dropped, inline roles kept
      as their text
  HTML (debian-handbook en-US, debian-reference-en, postgresql-doc): <p>/<li>/<dd>/<td>/<h*> text
  POD (perl-doc): =commands dropped, verbatim (indented) blocks dropped, X<...> formatting codes unwrapped
  roff man pages (manpages, manpages-dev): requests dropped, font escapes removed
  fortune files (fortunes): one quotation per paragraph
Every paragraph is whitespace-normalised and kept only when it looks like prose: >= 6 words, >= 70% of
its characters letters or spaces, >= 97% ASCII, and no more than 25% of its words containing code-like characters.
"""
import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
import sys

PACKAGES = ["dict-gcide", "wordnet-base", "dict-foldoc", "dict-jargon", "dict-devil", "fortunes",
            "python3.11-doc", "linux-doc-6.1", "git-doc", "perl-doc", "debian-handbook", "debian-reference-en",
            "postgresql-doc-15", "manpages", "manpages-dev", "gnu-standards"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read(path):
    op = gzip.open if path.endswith((".gz", ".dz")) else open
    with op(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# ------------------------------------------------------------------ paragraph filter
CODEY = re.compile(r"[{}\[\]<>=_/\\|#$@;`~^*]")


def norm_para(p):
    return " ".join(p.split())


def prose(p):
    w = p.split()
    if len(w) < 6:
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in p)
    if letters < 0.7 * len(p):
        return False
    if sum(ord(ch) < 128 for ch in p) < 0.97 * len(p):     # English only (perl-doc has translations)
        return False
    if sum(bool(CODEY.search(x)) for x in w) > 0.25 * len(w):
        return False
    return True


def paragraphs(text):
    """Blank-line separated paragraphs, whitespace-normalised, prose only."""
    out = []
    for p in re.split(r"\n\s*\n", text):
        p = norm_para(p)
        if p and prose(p):
            out.append(p)
    return out


# ------------------------------------------------------------------ dictd
def dictd_docs_simple(path, per_doc=40, gcide=False):
    """One paragraph per dictionary entry: 'Headword: definition text'."""
    txt = read(path)
    lines = txt.split("\n")
    entries, cur = [], None
    prev_blank = True
    for line in lines:
        if line and not line[0].isspace() and prev_blank:
            if cur:
                entries.append(cur)
            cur = [line.strip(), []]
        elif cur is not None:
            cur[1].append(line)
        prev_blank = not line.strip()
    if cur:
        entries.append(cur)
    docs, paras = [], []
    for head, body in entries:
        b = "\n".join(body)
        if gcide:
            head = re.sub(r"\\[^\\]*\\", "", head)
            b = re.sub(r"\[(1913 Webster|WordNet 1\.5|PJC|Webster 1913 Suppl\.|Century Dict\.|[^\]]{0,12}Webster[^\]]*)\]", "", b)
        b = re.sub(r"[{}]", "", b)
        b = re.sub(r"<[^>\n]{1,30}>", "", b)
        head = norm_para(re.sub(r"[{}]", "", head)).rstrip(",")
        for k, p in enumerate(re.split(r"\n\s*\n", b)):
            p = norm_para(p)
            if not p:
                continue
            if k == 0 and head and not p.lower().startswith(head.lower()[:8]):
                p = head + ": " + p
            if prose(p):
                paras.append(p)
        if len(paras) >= per_doc:
            docs.append(paras)
            paras = []
    if paras:
        docs.append(paras)
    return docs


# ------------------------------------------------------------------ wordnet
def wordnet_docs(root, per_doc=60):
    docs, paras = [], []
    for part in ("noun", "verb", "adj", "adv"):
        path = os.path.join(root, "data." + part)
        if not os.path.exists(path):
            continue
        for line in read(path).split("\n"):
            if not line or line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [re.sub(r"\(.*\)$", "", w) for w in words]
            g = norm_para(gloss)
            # gloss; "example sentence"; ... -> keep as is, add a full stop
            p = ", ".join(words[:4]) + ": " + g
            if not p.endswith((".", "!", "?", '"')):
                p += "."
            paras.append(p)
            if len(paras) >= per_doc:
                docs.append(paras)
                paras = []
    if paras:
        docs.append(paras)
    return docs


# ------------------------------------------------------------------ reStructuredText / AsciiDoc
ROLE = re.compile(r":[a-zA-Z:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")


def rst_text(txt):
    out = []
    lines = txt.split("\n")
    skip_indent = None
    for i, line in enumerate(lines):
        s = line.strip()
        ind = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if s and ind <= skip_indent:
                skip_indent = None
            else:
                continue
        if s.startswith(".. ") or s == "..":
            skip_indent = ind
            out.append("")
            continue
        if s.endswith("::") and not s.startswith(".."):
            # paragraph introducing a literal block: keep the sentence, drop the block
            out.append(line.rstrip(":") + ("." if s != "::" else ""))
            skip_indent = ind
            out.append("")
            continue
        if re.fullmatch(r"([=\-~^\"'`#*+_.:])\1{2,}", s):          # section underline / overline
            out.append("")
            continue
        if s.startswith(("+--", "|", "+==")) or re.fullmatch(r"[= ]{6,}", s):
            out.append("")
            continue
        if s.startswith(("----", "....", "////", "____")):
            out.append("")
            continue
        line = ROLE.sub(r"\1", line)
        line = re.sub(r"``([^`]*)``", r"\1", line)
        line = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", line)
        line = re.sub(r"`([^`]*)`_*", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
        line = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*", r"\1", line)
        line = re.sub(r"^\s*[-*+] ", "", line)
        line = re.sub(r"^\s*(\d+|#)\. ", "", line)
        out.append(line)
    return "\n".join(out)


# ------------------------------------------------------------------ HTML
class _HTML(html.parser.HTMLParser):
    BLOCK = {"p", "li", "dd", "dt", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "div", "br", "tr",
             "blockquote", "section", "table", "ul", "ol", "dl", "title"}
    SKIP = {"script", "style", "pre", "code", "head", "nav", "footer", "header"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP and tag != "code":
            self.skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and tag != "code":
            self.skip = max(0, self.skip - 1)
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, d):
        if not self.skip:
            self.parts.append(d.replace("\n", " "))


def html_text(txt):
    p = _HTML()
    try:
        p.feed(txt)
        p.close()
    except Exception:  # malformed HTML: take what was parsed
        pass
    return "".join(p.parts)


# ------------------------------------------------------------------ POD / roff / info / fortunes
def pod_text(txt):
    out, in_pod = [], True
    for block in re.split(r"\n\s*\n", txt):
        if block.startswith("=cut"):
            in_pod = False
            continue
        if block.startswith("="):
            in_pod = True
            if block.startswith(("=head", "=item")):
                t = block.split(None, 1)[1] if len(block.split(None, 1)) > 1 else ""
                out.append(t)
            continue
        if not in_pod or block[:1].isspace():
            continue
        for _ in range(3):
            block = re.sub(r"[A-Z]<<+\s*(.*?)\s*>>+", r"\1", block)
            block = re.sub(r"[A-Z]<([^<>]*)>", lambda m: m.group(1).split("|")[0], block)
        out.append(block)
    return "\n\n".join(out)


def roff_text(txt):
    out = []
    for line in txt.split("\n"):
        if line.startswith((".", "'")):
            req = line[1:].split(None, 1)
            if req and req[0] in ("SH", "SS") and len(req) > 1:
                out += ["", req[1].strip('"'), ""]
            elif req and req[0] in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                out.append("")
            elif req and req[0] in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB") and len(req) > 1:
                out.append(re.sub(r'"', "", req[1]))
            continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\f\[[^\]]*\]", "", line)
        line = line.replace("\\-", "-").replace("\\(em", "\u2014").replace("\\(en", "\u2013")
        line = re.sub(r"\\\(..|\\\[[^\]]*\]|\\[&|^e\\ ]|\\\*\(..|\\\*.", "", line)
        out.append(line)
    return "\n".join(out)


def info_text(txt):
    txt = txt.replace("\x1f", "\n\n")
    txt = re.sub(r"^File: .*$", "", txt, flags=re.M)
    txt = re.sub(r"^\* Menu:.*$", "", txt, flags=re.M)
    return txt


def fortune_docs(root, per_doc=30):
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "*"))):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path) or os.path.islink(path):
            continue
        quotes = [norm_para(q) for q in read(path).split("\n%\n")]
        quotes = [q for q in quotes if prose(q)]
        for i in range(0, len(quotes), per_doc):
            docs.append(quotes[i:i + per_doc])
    return docs


# ------------------------------------------------------------------ per package
def split_doc(paras, max_chars=12000):
    """Long files -> several documents of <= max_chars."""
    out, cur, n = [], [], 0
    for p in paras:
        if cur and n + len(p) > max_chars:
            out.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += len(p)
    if cur:
        out.append(cur)
    return out


def files_docs(files, to_text):
    docs = []
    for path in files:
        try:
            paras = paragraphs(to_text(read(path)))
        except Exception as e:  # one bad file must not stop the build
            log("  skip", path, repr(e)[:100])
            continue
        docs += [(os.path.basename(path), d) for d in split_doc(paras)]
    return docs


def extract(pkg, root):
    """-> list of (name, [paragraph, ...])"""
    g = lambda pat: sorted(glob.glob(os.path.join(root, pat), recursive=True))
    if pkg.startswith("dict-"):
        out = []
        for path in g("usr/share/dictd/*.dict.dz"):
            out += [(os.path.basename(path), d) for d in dictd_docs_simple(path, gcide=pkg == "dict-gcide")]
        return out
    if pkg == "wordnet-base":
        return [("wordnet", d) for d in wordnet_docs(os.path.join(root, "usr/share/wordnet"))]
    if pkg == "fortunes":
        return [("fortunes", d) for d in fortune_docs(os.path.join(root, "usr/share/games/fortunes"))]
    if pkg.startswith("python3"):
        return files_docs(g("usr/share/doc/python3*/html/_sources/**/*.rst.txt"), rst_text)
    if pkg.startswith("linux-doc"):
        return files_docs(g("usr/share/doc/linux-doc*/Documentation/**/*.rst.gz"), rst_text)
    if pkg == "git-doc":
        return files_docs(g("usr/share/doc/git-doc/**/*.txt"), rst_text)
    if pkg == "perl-doc":
        return files_docs(g("usr/share/perl/**/*.pod") + g("usr/share/perl/**/*.pod.gz"), pod_text)
    if pkg == "debian-handbook":
        return files_docs(g("usr/share/doc/debian-handbook/html/en-US/*.html"), html_text)
    if pkg.startswith("debian-reference"):
        return files_docs(g("usr/share/doc/debian-reference-en/**/*.en.html"), html_text)
    if pkg.startswith("postgresql-doc"):
        return files_docs(g("usr/share/doc/postgresql-doc-*/html/*.html"), html_text)
    if pkg.startswith("manpages"):
        return files_docs(g("usr/share/man/man*/*.gz"), roff_text)
    if pkg == "gnu-standards":
        return files_docs(g("usr/share/info/*.info*") + g("usr/share/doc/gnu-standards/*.html"),
                          lambda t: html_text(t) if "<html" in t[:2000].lower() else info_text(t))
    raise ValueError(pkg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".devcarry/corpus")
    ap.add_argument("--work", default="/tmp/redknot-corpus-work",
                    help="scratch folder for the .deb files and their unpacked trees (not carried)")
    ap.add_argument("--debs", default="", help="folder with the .deb files (default: WORK/debs, downloaded)")
    ap.add_argument("--packages", default=",".join(PACKAGES))
    ap.add_argument("--seed", default="corpus-v1")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    debs = a.debs or os.path.join(a.work, "debs")
    os.makedirs(debs, exist_ok=True)
    pkgs = a.packages.split(",")
    have = lambda p: glob.glob(os.path.join(debs, p + "_*.deb"))
    missing = [p for p in pkgs if not have(p)]
    if missing:
        log("apt-get download", " ".join(missing))
        subprocess.run(["apt-get", "download"] + missing, cwd=debs, check=True)
    xroot = os.path.join(a.work, "x")
    seen = set()
    docs = []
    stats = {"packages": {}}
    for p in pkgs:
        deb = sorted(have(p))[-1]
        root = os.path.join(xroot, p)
        if not os.path.isdir(root):
            os.makedirs(root, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        got = extract(p, root)
        nd = npara = nch = ndup = 0
        for name, paras in got:
            keep = []
            for q in paras:
                h = hashlib.sha1(q.lower().encode()).digest()[:12]
                if h in seen:
                    ndup += 1
                    continue
                seen.add(h)
                keep.append(q)
            if not keep:
                continue
            text = "\n\n".join(keep)
            docs.append({"src": p, "name": name, "text": text})
            nd += 1
            npara += len(keep)
            nch += len(text)
        stats["packages"][p] = {"deb": os.path.basename(deb), "documents": nd, "paragraphs": npara,
                                "chars": nch, "duplicate_paragraphs": ndup}
        log(f"{p:22s} {os.path.basename(deb):48s} docs {nd:6d} paras {npara:7d} chars {nch / 1e6:7.2f}M dup {ndup}")
    random.Random(a.seed).shuffle(docs)
    path = os.path.join(a.out, "corpus.jsonl.gz")
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    stats["documents"] = len(docs)
    stats["chars"] = sum(len(d["text"]) for d in docs)
    stats["gz_bytes"] = os.path.getsize(path)
    with open(os.path.join(a.out, "corpus_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    log(f"wrote {path}: {len(docs)} documents, {stats['chars'] / 1e6:.1f}M chars, {stats['gz_bytes'] / 1e6:.1f} MB gz")


if __name__ == "__main__":
    main()
